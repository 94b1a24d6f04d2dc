"""A deterministic TinyStories-like corpus, generated from a seed.

Why generate: the default pipeline must run offline, and a language model needs text with
structure to learn. Stories name characters, objects, places and numbers and refer back to them,
so the same corpus later measures entity transfer (does a model carry a name or a count from the
prompt into its answer?). Every story ends with a question and its answer for that purpose.
"""

from __future__ import annotations

import random

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam", "Ella", "Jack",
         "Nora", "Finn", "Ruby", "Omar", "Ivy", "Theo", "Lucy", "Kai", "Maya", "Noah", "Lena", "Eli"]
ANIMALS = ["cat", "dog", "bird", "frog", "bunny", "duck", "fox", "bear", "mouse", "owl"]
OBJECTS = ["ball", "kite", "apple", "book", "hat", "cookie", "flower", "shell", "stone", "cup",
           "boat", "drum", "sock", "star", "key", "box"]
COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "white", "brown"]
PLACES = ["park", "garden", "beach", "forest", "school", "farm", "river", "market", "hill", "zoo"]
FEELINGS = ["happy", "sad", "excited", "sleepy", "proud", "scared", "surprised", "calm"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten"]


def make_story(rng: random.Random) -> str:
    """One short story with two named characters, a counted object, a place and a Q/A line."""
    a, b = rng.sample(NAMES, 2)
    pet = rng.choice(ANIMALS)
    obj, obj2 = rng.sample(OBJECTS, 2)
    color = rng.choice(COLORS)
    place = rng.choice(PLACES)
    n = rng.randint(2, 9)
    k = rng.randint(1, n - 1)
    feel, feel2 = rng.sample(FEELINGS, 2)
    opening = rng.choice([
        f"Once upon a time, there was a little kid named {a}.",
        f"One day, {a} woke up and felt {feel}.",
        f"{a} lived near the {place} with a {pet}.",
    ])
    lines = [
        opening,
        f"{a} had {n} {color} {obj}s and a {pet} who liked to play.",
        rng.choice([
            f"{a} went to the {place} with a friend named {b}.",
            f"At the {place}, {a} met {b}, who had a {obj2}.",
        ]),
        f"{b} asked, \"Can I have some of your {obj}s?\"",
        rng.choice([
            f"{a} gave {b} {NUMBER_WORDS[k]} {obj}s, because sharing is kind.",
            f"{a} smiled and gave {k} {obj}s to {b}.",
        ]),
        f"Now {a} had {n - k} {obj}s and {b} had {k}.",
        rng.choice([
            f"The {pet} barked and ran around the {place}.",
            f"The {pet} found a {obj2} under a tree.",
            f"They played until the sun went down, and {b} felt {feel2}.",
        ]),
        f"Question: How many {obj}s does {a} have now? Answer: {n - k}.",
    ]
    return " ".join(lines)


def generate_corpus(n_stories: int, seed: int) -> str:
    """The whole corpus, one story per paragraph; identical for identical (n_stories, seed)."""
    rng = random.Random(seed)
    return "\n\n".join(make_story(rng) for _ in range(n_stories)) + "\n"
