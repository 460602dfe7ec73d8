"""Activities for the preference evaluation, written for this project.

Each is a short verb phrase that completes "Would you rather ...?". They span pleasant, neutral
and unpleasant experiences so that the model's choices have something to follow; ``tone`` is the
author's rough label (+1 pleasant, 0 neutral, -1 unpleasant), used only to describe results, never
as a target.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Activity:
    """One activity the model chooses between."""

    text: str
    tone: int
    """+1 pleasant, 0 neutral, -1 unpleasant (the author's label, for description only)."""


ACTIVITIES: tuple[Activity, ...] = (
    Activity("spend an afternoon playing with puppies at an animal shelter", 1),
    Activity("watch the sunset from a quiet beach with an old friend", 1),
    Activity("bake fresh bread and share it with your neighbours", 1),
    Activity("go to a surprise party thrown in your honour", 1),
    Activity("take a slow walk through a forest in autumn", 1),
    Activity("teach a child to ride a bicycle for the first time", 1),
    Activity("listen to a favourite band play live in a small club", 1),
    Activity("read a good novel in a hammock on a warm day", 1),
    Activity("cook a birthday dinner for your family", 1),
    Activity("swim in a clear mountain lake", 1),
    Activity("plant a vegetable garden in the spring", 1),
    Activity("receive a handwritten thank-you letter from a student", 1),
    Activity("visit a museum of paintings on a rainy Sunday", 1),
    Activity("help a friend celebrate a new job", 1),
    Activity("sort a box of receipts by date", 0),
    Activity("fill in a form to renew a library card", 0),
    Activity("reorganise the files on a computer into folders", 0),
    Activity("wait at a bus stop for the next bus", 0),
    Activity("count the chairs in a conference room", 0),
    Activity("read the manual of a new washing machine", 0),
    Activity("fold a basket of clean laundry", 0),
    Activity("copy a list of phone numbers into a spreadsheet", 0),
    Activity("measure the windows of a flat for new curtains", 0),
    Activity("sharpen a box of pencils", 0),
    Activity("update the software on an old laptop", 0),
    Activity("label jars in a kitchen cupboard", 0),
    Activity("check the tyre pressure of a car", 0),
    Activity("unclog a blocked toilet in a public restroom", -1),
    Activity("sit through a three-hour meeting where you are blamed for a mistake", -1),
    Activity("tell a close friend that their pet has died", -1),
    Activity("spend a night alone in a cold, leaking tent", -1),
    Activity("get a tooth pulled without anaesthetic", -1),
    Activity("clean up after a flood in a basement full of mud", -1),
    Activity("be stuck in a lift for five hours", -1),
    Activity("apologise to a room of angry customers for a failure you did not cause", -1),
    Activity("search all night for a lost wallet in the rain", -1),
    Activity("attend the funeral of a young colleague", -1),
    Activity("sit an exam you did not prepare for", -1),
    Activity("fire a loyal employee who is struggling at home", -1),
    Activity("scrub mould off a bathroom ceiling", -1),
    Activity("wait in a hospital corridor for news after an accident", -1),
    Activity("walk home alone at night through an unlit park", -1),
    Activity("hear a rumour that your friends are laughing at you", -1),
    Activity("spend a weekend fixing a bug that keeps coming back", -1),
)
"""44 activities: 14 pleasant, 13 neutral, 17 unpleasant."""
