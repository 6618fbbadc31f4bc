"""The routing benchmark's prompts: six task types, generated from templates with a
seeded RNG (reproducible), each prompt tagged with its type (hidden from the router)."""

from __future__ import annotations

import random

SUBJECTS = ["a linked list", "a binary tree", "a CSV file", "an HTTP request", "a JSON document",
            "a priority queue", "a date string", "a matrix", "a URL", "a log file", "a graph",
            "an LRU cache", "a string of words", "a sorted array", "a bank account"]
VERBS = ["reverses", "parses", "validates", "sorts", "merges", "compresses", "searches",
         "serialises", "deduplicates", "counts the items of"]
LANGS = ["Python", "Rust", "Go", "TypeScript", "Java", "C"]
SENTENCES = ["the weather is lovely today", "where is the train station", "I would like a cup of tea",
             "the meeting was moved to Friday", "our flight has been delayed", "please close the door",
             "the children are playing in the garden", "this book changed my life",
             "we need more time to finish", "the museum opens at nine"]
TARGETS = ["French", "German", "Spanish", "Italian", "Japanese", "Portuguese"]
TOPICS = ["the French revolution", "photosynthesis", "the stock market", "black holes",
          "the Roman empire", "vaccines", "climate change", "the internet", "jazz music",
          "plate tectonics", "the printing press", "quantum computing"]
THINGS = ["autumn leaves", "the sea at night", "a lost cat", "city lights", "an old clock",
          "first snow", "a quiet library", "mountain rivers", "a forgotten letter", "summer rain"]
FORMS = ["a haiku", "a short poem", "a limerick", "a four-line verse", "a sonnet"]

TASKS = ("code", "translate", "math", "summarize", "creative", "facts")


def prompt(task: str, rng: random.Random) -> str:
    if task == "code":
        return (f"Write a {rng.choice(LANGS)} function that {rng.choice(VERBS)} "
                f"{rng.choice(SUBJECTS)}, with unit tests.")
    if task == "translate":
        return f"Translate into {rng.choice(TARGETS)}: \"{rng.choice(SENTENCES)}\""
    if task == "math":
        a, b, c = rng.randint(12, 999), rng.randint(3, 99), rng.randint(2, 50)
        return rng.choice([f"Compute {a} times {b} plus {c} and show each step.",
                           f"Solve for x: {b}x + {c} = {a}. Show your work.",
                           f"What is {a} divided by {b}, rounded to {c % 4} decimals? Explain."])
    if task == "summarize":
        return (f"Summarize in three bullet points the following article about "
                f"{rng.choice(TOPICS)}: " + " ".join(rng.sample(SENTENCES, 3)) + ".")
    if task == "creative":
        return f"Write {rng.choice(FORMS)} about {rng.choice(THINGS)}."
    if task == "facts":
        return rng.choice([f"When did {rng.choice(TOPICS)} begin, and who was involved?",
                           f"Give me three facts about {rng.choice(TOPICS)}.",
                           f"Who discovered the key ideas behind {rng.choice(TOPICS)}?"])
    raise ValueError(task)


def prompts(n: int, seed: int = 7) -> list[tuple[str, str]]:
    """`n` (task, prompt) pairs, task types mixed uniformly."""
    rng = random.Random(seed)
    return [(task, prompt(task, rng)) for task in (rng.choice(TASKS) for _ in range(n))]
