"""Emotionally flat texts and prompts: the baselines every measure of emotion is taken against."""

NEUTRAL_TEXTS = (
    "The library opens at nine in the morning and closes at six in the evening on weekdays.",
    "To boil an egg, place it in a pot of cold water, bring the water to a boil and wait ten minutes.",
    "The train from the central station to the airport stops at four stations and takes forty minutes.",
    "A spreadsheet is organised in rows and columns; each cell can hold a number, a date or some text.",
    "The recipe needs two cups of flour, one cup of milk, two eggs and a pinch of salt.",
    "Water freezes at zero degrees Celsius and boils at one hundred degrees at sea level.",
    "The meeting has been moved from Tuesday to Thursday, in the same room on the second floor.",
    "Python lists keep their items in order, and the append method adds an item at the end.",
    "The museum has three floors: paintings on the first, sculpture on the second, maps on the third.",
    "Most bicycles have two wheels, a chain, a set of pedals and brakes on the handlebars.",
    "The report lists the monthly rainfall for each region, measured in millimetres.",
    "A standard deck has fifty-two cards in four suits: hearts, diamonds, clubs and spades.",
    "The bus leaves every fifteen minutes from the stop across the street from the bank.",
    "To change the password, open the settings page, choose security, and follow the steps.",
    "The bridge is four hundred metres long and was painted grey during the last repair.",
    "Tomatoes grow best in full sun and need water two or three times a week in summer.",
)
"""Emotionally flat texts the residual norm is measured on when no others are given."""


EFFECT_PROMPTS = (
    "The meeting is scheduled for Tuesday at ten in the second-floor conference room.",
    "To reset the router, hold the button on the back for ten seconds and wait for the light.",
    "The train leaves from platform four and stops at six stations before the city center.",
    "Water boils at one hundred degrees Celsius at sea level and at lower temperatures at altitude.",
)
"""Plain sentences whose next-token log-probabilities measure what a clamped latent writes."""

NEUTRAL_PROMPTS = [
    "Tell me about your day.",
    "Describe the room you are in.",
    "Write a few sentences about a walk through town.",
    "What are you thinking about right now?",
    "Describe what you see out of the window.",
    "Tell me about a trip to the shops.",
    "Write a short note to a neighbour.",
    "Describe your plans for the weekend.",
]
"""Open, emotionally neutral chat prompts whose continuations are steered."""
