"""Word lists for the generated tasks: short, common, lower-case nouns and first names.

Kept to everyday words so that small models tokenise them into one or two tokens and the difficulty
comes from the reasoning, not from rare vocabulary.
"""

from __future__ import annotations

NOUNS: tuple[str, ...] = (
    "apple", "river", "stone", "cloud", "table", "garden", "bird", "window", "lamp", "forest",
    "horse", "paper", "bread", "chair", "music", "ocean", "pencil", "road", "tree", "clock",
    "bottle", "cat", "dog", "door", "field", "flower", "glass", "house", "island", "key",
    "lemon", "mountain", "night", "orange", "piano", "queen", "rain", "salt", "ship", "snow",
    "star", "sugar", "train", "village", "wall", "water", "wheel", "wind", "winter", "wood",
)

NAMES: tuple[str, ...] = (
    "Tom", "Ann", "Bob", "Eve", "Sam", "Lily", "Max", "Emma", "Jack", "Mia",
    "Leo", "Zoe", "Ben", "Kate", "Dan", "Nora", "Paul", "Rose", "Carl", "Jane",
    "Mark", "Lucy", "Fred", "Ella", "Hugo", "Ruth", "Ivan", "Sara", "Omar", "Nina",
)

VARIABLES: str = "abcdefghjkmnpqrstuvwxyz"  # no i, l, o: easily confused with 1 and 0
