"""Craftax's own human-play key bindings, as browser `KeyboardEvent.key` values.

Copied from the `KEY_MAPPING` tables of the craftax package (craftax 1.6:
`craftax/craftax_classic/play_craftax_classic.py` for Classic, `craftax/craftax/play_craftax.py`
for full Craftax), pygame key -> action; tests/test_play.py re-reads those source files and checks
that these tables are the same. They are copied rather than imported because importing the play
scripts imports pygame (which opens no window but is not needed here, and the GPU wheels omit it).

pygame names map to browser keys as: K_a.. -> "a".., K_1.. -> "1".., K_SPACE -> " ",
K_TAB -> "Tab", K_COMMA -> ",", K_PERIOD -> ".", K_LEFTBRACKET -> "[", K_RIGHTBRACKET -> "]",
K_MINUS -> "-", K_EQUALS -> "=", K_SEMICOLON -> ";".
"""

from __future__ import annotations

CLASSIC = (
    ("q", "noop"),
    ("w", "up"),
    ("d", "right"),
    ("s", "down"),
    ("a", "left"),
    (" ", "do"),
    ("t", "place_table"),
    ("Tab", "sleep"),
    ("r", "place_stone"),
    ("f", "place_furnace"),
    ("p", "place_plant"),
    ("1", "make_wood_pickaxe"),
    ("2", "make_stone_pickaxe"),
    ("3", "make_iron_pickaxe"),
    ("4", "make_wood_sword"),
    ("5", "make_stone_sword"),
    ("6", "make_iron_sword"),
)

FULL = (
    ("q", "noop"),
    ("w", "up"),
    ("d", "right"),
    ("s", "down"),
    ("a", "left"),
    (" ", "do"),
    ("1", "make_wood_pickaxe"),
    ("2", "make_stone_pickaxe"),
    ("3", "make_iron_pickaxe"),
    ("4", "make_diamond_pickaxe"),
    ("5", "make_wood_sword"),
    ("6", "make_stone_sword"),
    ("7", "make_iron_sword"),
    ("8", "make_diamond_sword"),
    ("t", "place_table"),
    ("Tab", "sleep"),
    ("r", "place_stone"),
    ("f", "place_furnace"),
    ("p", "place_plant"),
    ("e", "rest"),
    (",", "ascend"),
    (".", "descend"),
    ("y", "make_iron_armour"),
    ("u", "make_diamond_armour"),
    ("i", "shoot_arrow"),
    ("o", "make_arrow"),
    ("g", "cast_fireball"),
    ("h", "cast_iceball"),
    ("j", "place_torch"),
    ("z", "drink_potion_red"),
    ("x", "drink_potion_green"),
    ("c", "drink_potion_blue"),
    ("v", "drink_potion_pink"),
    ("b", "drink_potion_cyan"),
    ("n", "drink_potion_yellow"),
    ("m", "read_book"),
    ("k", "enchant_sword"),
    ("l", "enchant_armour"),
    ("[", "make_torch"),
    ("]", "level_up_dexterity"),
    ("-", "level_up_strength"),
    ("=", "level_up_intelligence"),
    (";", "enchant_bow"),
)

BINDINGS = {"classic": CLASSIC, "full": FULL}

# Keys of the page itself; none of them is bound by either game.
PAGE_KEYS = (("Enter", "agent plays / stop the agent"), ("Backspace", "reset"))


def key_bindings(env_name: str, action_meanings: tuple[str, ...]) -> list[dict]:
    """[{key, label, action, name}] for the env's bindings; `action` indexes `action_meanings`."""
    out = []
    for key, name in BINDINGS[env_name]:
        if name not in action_meanings:
            raise ValueError(f"craftax {env_name} has no action {name!r} (actions: {', '.join(action_meanings)})")
        label = {" ": "space", "Tab": "tab"}.get(key, key)
        out.append({"key": key, "label": label, "action": action_meanings.index(name), "name": name})
    return out
