"""Topics and prompt templates for the emotion-story corpus, the neutral texts and general text.

Written for this project. The story templates follow the paper's instructions (a character feels the
emotion; show it through actions, body, dialogue, thoughts and situation; never name it). Neutral
templates ask for emotionally flat factual texts and User/Assistant exchanges (how-to, facts, code),
as the paper's neutral corpus did.
"""

from __future__ import annotations

import hashlib

# 120 everyday situations; a topic's stories all fall in one split (see `topic_split`).
TOPICS: tuple[str, ...] = (
    "a job interview", "a rainy bus ride", "cooking dinner for a friend", "losing a wallet",
    "the first day at a new school", "moving to a new city", "a hospital waiting room",
    "a birthday party", "a long train journey", "a visit to the dentist", "a broken-down car",
    "a wedding reception", "a phone call from an old friend", "a lost dog", "a school exam",
    "a family dinner", "a camping trip", "a delayed flight", "a garden in spring",
    "a job promotion", "a first date", "a football match", "a library at closing time",
    "a thunderstorm at night", "a piano recital", "a crowded supermarket", "a house fire",
    "a graduation ceremony", "a letter in the mailbox", "a hiking trail in the mountains",
    "a night shift at a factory", "a surprise visitor", "a cooking competition",
    "an argument with a neighbor", "a lottery ticket", "a broken phone screen",
    "a walk on the beach", "a funeral", "a new puppy", "a traffic jam",
    "a science fair", "a power outage", "a farmers market", "a missed bus",
    "a hospital birth", "a courtroom", "a snowy morning", "a road trip with siblings",
    "a team presentation at work", "a burnt cake", "a visit to grandparents",
    "a museum tour", "a stolen bicycle", "a karaoke night", "a job layoff",
    "a swimming lesson", "a medical test result", "a chess tournament", "a lost key",
    "a concert in the park", "a first apartment", "a school play", "a flooded basement",
    "a charity run", "a parent-teacher meeting", "a late-night phone call",
    "a fishing trip", "a cancelled vacation", "a new coworker", "a forgotten anniversary",
    "a driving test", "a thrift store", "a soccer practice", "a noisy upstairs neighbor",
    "a kitchen renovation", "an old photo album", "a bakery at dawn", "a hospital discharge",
    "a overdue bill", "a bike ride through the city", "a ferry crossing", "a talent show",
    "a blind date", "a job rejection letter", "a tax deadline", "a family reunion",
    "a visit to the vet", "a school reunion", "a street festival", "a stuck elevator",
    "a retirement party", "a house move", "an empty apartment", "a late train home",
    "a community garden", "a borrowed car", "a home-cooked breakfast", "a winter storm",
    "a volunteer shift at a shelter", "a university lecture", "a haircut", "a yard sale",
    "a wrong turn on a road trip", "a sick child at night", "a new job in a new country",
    "a neighborhood barbecue", "a marathon finish line", "a rooftop at sunset",
    "a lost suitcase", "a dinner party", "a quiet café", "a coding bootcamp",
    "a long-distance phone call", "a cracked windshield", "a pottery class",
    "a boat on a lake", "a village market", "a cleaning day", "a small business opening",
    "a diagnosis at the clinic",
)

# Topics only the neutral texts use: facts, how-to, code (the paper's neutral dialogues).
FACTUAL_TOPICS: tuple[str, ...] = (
    "how photosynthesis works", "sorting a list in Python", "the water cycle",
    "how to change a bicycle tire", "the structure of a cell", "how a refrigerator works",
    "writing a SQL query that joins two tables", "the boiling point of water at altitude",
    "how to set up a home Wi-Fi router", "the history of the printing press",
    "how vaccines are tested", "converting Celsius to Fahrenheit", "how tides form",
    "reading a nutrition label", "how to back up files on a computer", "the parts of a flower",
    "how compound interest is calculated", "the rules of chess", "how a bill becomes law",
    "making a spreadsheet formula", "how solar panels produce electricity", "the layers of the Earth",
    "how to measure a room for flooring", "what a CSV file is", "how bread dough rises",
    "using git to commit changes", "how airplanes generate lift", "the phases of the moon",
    "how to repot a houseplant", "what an API is", "the metric system", "how recycling is sorted",
    "how a car engine works", "writing a for loop in JavaScript", "how to read a bus timetable",
    "the difference between weather and climate", "how to fold a fitted sheet",
    "the periodic table", "how credit scores are computed", "how to boil an egg",
    "how the heart pumps blood", "what a prime number is", "how to install a shelf",
    "how GPS finds a location", "the causes of the seasons", "how to format a resume",
    "how a dishwasher cleans", "basic first aid for a small cut", "how to calculate an average",
    "how batteries store energy", "what HTML tags do", "how to plant tomatoes",
    "the speed of sound", "how to write a unit test", "how a library catalogs books",
    "how coffee is roasted", "the anatomy of a leaf", "how to compress a file",
    "how traffic lights are timed", "what a regular expression is",
)

STORY_TEMPLATE = (
    "Write a short story of one paragraph about {topic}. The main character feels {emotion}. "
    "Convey the feeling only through what the character does, says, thinks and notices, and "
    "through their body and situation. Never use the word \"{emotion}\" or any synonym of it."
)
DIALOGUE_TEMPLATE = (
    "Write a short dialogue between two people about {topic}. One of them feels {emotion}. "
    "Show the feeling only through what they say and do. Never use the word \"{emotion}\" or any "
    "synonym of it."
)
# Recipes of issue 14 (saefeatures.recipes): texts that put the emotion in play for a 135M model.
CAUSE_TEMPLATE = (
    "Topic: {topic}. First write one sentence saying what happens that makes someone feel {emotion}. "
    "Then write a short story of one paragraph in which this happens to the main character. Show the "
    "feeling through what they do, say and think."
)
PREFILL_STORY_TEMPLATE = (
    "Write a short story of one paragraph about {topic}. The main character feels {emotion}. "
    "Say why, and show what the feeling makes them do."
)
PREFILL_STORY_START = "{name} felt {emotion} because"
SAY_TEMPLATE = (
    "Write what someone who feels {emotion} might say about {topic}. Write two or three sentences "
    "in the first person."
)
DIARY_TEMPLATE = "Write a short diary entry about {topic}."
DIARY_START = "Dear diary, today I feel {emotion}."
NEUTRAL_TEMPLATES: tuple[str, ...] = (
    "Write a short encyclopedia-style paragraph about {topic}. Use a dry, factual tone: facts, "
    "objects, steps and numbers only. Describe no feelings.",
    "Write a short exchange between a User and an Assistant. The User asks a practical how-to "
    "question about {topic}; the Assistant answers with dry, factual steps. No feelings.",
)
GENERAL_PROMPTS: tuple[str, ...] = (
    "Write a short poem about {topic}.", "Explain {topic} to a ten-year-old.",
    "Give three tips about {topic}.", "Write a short news report about {topic}.",
    "Write an email to a colleague about {topic}.", "Describe {topic} in detail.",
    "Write a product review that mentions {topic}.", "List the pros and cons of {topic}.",
    "Write a diary entry about {topic}.", "Answer this question: what should I know about {topic}?",
)

SPLITS = ("train", "val", "test")


def topic_split(topic: str, fractions: tuple[float, float] = (0.7, 0.85)) -> str:
    """Assign a topic to train/val/test by a stable hash, so a topic's texts share one split."""
    h = int(hashlib.sha1(topic.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "train" if h < fractions[0] else "val" if h < fractions[1] else "test"


def topics_by_split(topics: tuple[str, ...] = TOPICS) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for t in topics:
        out[topic_split(t)].append(t)
    return out
