"""A built-in multi-task demo, generated in memory from templates and word lists.

Three small tasks shaped like GLUE ones (sentiment like SST-2, paraphrase like MRPC,
similarity like STS-B) so the whole pipeline runs without downloading anything. They are
built to be learnable by a small pretrained encoder but not by a trivial rule: sentiment
has negations and contrasts, both classes of paraphrase pairs are reworded alike and
negatives also change one fact, and similarity sentences use synonyms for shared
attributes and share words across different ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

DEMO_SPLITS = ("train", "dev")
_SIZES = {"train": 600, "dev": 300}


@dataclass(frozen=True)
class DemoTask:
    """What a task config needs to read a demo task.

    Attributes:
        kind: ``classification`` or ``regression``.
        text_column: Column of the (first) sentence.
        text_pair_column: Column of the second sentence, or None.
        label_column: Column of the label.
        labels: The label set of a classification task (as strings), or None.
        description: One line for listings.
    """

    kind: str
    text_column: str
    text_pair_column: str | None
    label_column: str
    labels: tuple[str, ...] | None
    description: str


DEMO_TASKS: dict[str, DemoTask] = {
    "sentiment": DemoTask("classification", "sentence", None, "label", ("negative", "positive"),
                          "review sentence -> positive/negative, with negation and contrast"),
    "paraphrase": DemoTask("classification", "sentence1", "sentence2", "label", ("0", "1"),
                           "sentence pair -> 1 if the second restates the first"),
    "similarity": DemoTask("regression", "sentence1", "sentence2", "score", None,
                           "sentence pair -> 0-5 share of scene attributes in common"),
}


def generate(name: str, split: str, seed: int = 0) -> pd.DataFrame:
    """Generate the raw rows of one split of a demo task, as a file would hold them.

    Args:
        name: A key of ``DEMO_TASKS``.
        split: ``train`` (600 rows) or ``dev`` (300 rows).
        seed: Seed; the same seed gives the same rows.

    Returns:
        sentiment: columns ``sentence``, ``label`` ("positive"/"negative");
        paraphrase: ``sentence1``, ``sentence2``, ``label`` (int 0/1);
        similarity: ``sentence1``, ``sentence2``, ``score`` (float in [0, 5]).

    Raises:
        ValueError: Unknown task or split.
    """
    if name not in DEMO_TASKS:
        raise ValueError(f"unknown demo task {name!r}; the demo tasks are: {', '.join(DEMO_TASKS)}")
    if split not in DEMO_SPLITS:
        raise ValueError(f"unknown demo split {split!r}; the splits are: {', '.join(DEMO_SPLITS)}")
    # dev leaves out every input that train holds, so scores measure generalization.
    taken = set() if split == "train" else {_inputs(r) for r in _rows(name, "train", seed, set())}
    return pd.DataFrame(_rows(name, split, seed, taken))


def _inputs(row: dict) -> tuple:
    return tuple(v for k, v in row.items() if k.startswith("sentence"))


def _rows(name: str, split: str, seed: int, taken: set[tuple]) -> list[dict]:
    # One independent stream per (seed, task, split): dev is not a continuation of train.
    rng = np.random.default_rng([seed, list(DEMO_TASKS).index(name), DEMO_SPLITS.index(split)])
    size = _SIZES[split]
    # Targets are dealt in equal shares, then shuffled, so classes are balanced exactly.
    targets = rng.permutation(np.arange(size) % _TARGETS[name])
    rows = []
    for target in targets:
        row = _MAKERS[name](rng, int(target))
        while _inputs(row) in taken:
            row = _MAKERS[name](rng, int(target))
        rows.append(row)
    return rows


def _pick(rng: np.random.Generator, options: Sequence):
    return options[rng.integers(len(options))]


def _other(rng: np.random.Generator, options: Sequence, current):
    """A random option different from `current`."""
    choice = current
    while choice == current:
        choice = _pick(rng, options)
    return choice


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


# --- sentiment ----------------------------------------------------------------------

_REVIEWED = [
    "movie", "film", "plot", "acting", "soundtrack", "ending", "script", "cast", "dialogue",
    "camera work", "pacing", "sequel", "story", "lead performance", "villain", "humor",
    "score", "opening scene", "finale", "direction", "screenplay", "animation", "book",
    "novel", "album", "show", "first episode", "documentary", "play", "musical", "concert",
    "premise", "main character",
]
_POSITIVE = [
    "good", "great", "wonderful", "brilliant", "charming", "moving", "delightful", "gripping",
    "clever", "funny", "beautiful", "excellent", "superb", "heartfelt", "memorable",
    "engaging", "stunning", "inventive", "touching", "thrilling", "enjoyable", "fresh",
    "witty", "solid", "impressive", "powerful", "lovely", "smart", "warm", "fantastic",
    "terrific", "satisfying",
]
_NEGATIVE = [
    "bad", "boring", "dull", "awful", "terrible", "clumsy", "tedious", "bland", "forgettable",
    "messy", "predictable", "painful", "weak", "lifeless", "shallow", "confusing", "annoying",
    "stale", "flat", "slow", "pointless", "dreadful", "sloppy", "uninspired", "lazy",
    "disappointing", "mediocre", "tiresome", "cheap", "silly", "awkward", "hollow",
]
_INTENSIFIERS = ["", "", "", "really ", "truly ", "quite ", "rather ", "very ", "incredibly ",
                 "pretty ", "surprisingly ", "somewhat "]
_AFFIRMED = [
    "the {n} was {i}{a}", "I found the {n} {i}{a}", "the {n} felt {i}{a}",
    "the {n} is {i}{a}", "the {n} turned out {i}{a}", "the {n} seemed {i}{a}",
]
_NEGATED = [
    "the {n} was not {a}", "I did not find the {n} {a}", "the {n} never felt {a}",
    "nobody would call the {n} {a}", "the {n} was far from {a}", "the {n} wasn't {i}{a}",
    "the {n} was anything but {a}", "the {n} is hardly {a}", "the {n} was not exactly {a}",
]
_OPENERS = ["", "", "", "", "overall, ", "honestly, ", "in the end, ", "to be fair, ",
            "looking back, ", "after two hours, ", "on a rainy Sunday, ", "for what it's worth, ",
            "with my friends, ", "on the second viewing, "]
_CLOSERS = ["", "", "", "", "", " I saw it last week.", " It runs about two hours.",
            " My brother picked it.", " The theater was half empty.", " We had popcorn.",
            " It came out in spring."]


def _clause(rng: np.random.Generator, positive: bool) -> str:
    """A clause about one reviewed thing whose overall polarity is `positive`."""
    negated = rng.random() < 0.35
    # A negated clause carries the opposite adjective: "not good" is negative.
    adjective = _pick(rng, _POSITIVE if positive != negated else _NEGATIVE)
    template = _pick(rng, _NEGATED if negated else _AFFIRMED)
    return template.format(n=_pick(rng, _REVIEWED), a=adjective, i=_pick(rng, _INTENSIFIERS))


def _make_sentiment(rng: np.random.Generator, target: int) -> dict:
    positive = target == 1
    shape = rng.random()
    closer = ""
    if shape < 0.5:
        body = _clause(rng, positive)
        closer = _pick(rng, _CLOSERS)  # only here: two clauses and a closer run too long
    elif shape < 0.8:
        # The clause after "but" (or the main clause after "although") decides.
        first = _clause(rng, not positive if rng.random() < 0.8 else positive)
        last = _clause(rng, positive)
        body = f"{first}, but {last}" if rng.random() < 0.6 else f"although {first}, {last}"
    else:
        body = f"{_clause(rng, positive)} and {_clause(rng, positive)}"
    text = _sentence(_pick(rng, _OPENERS) + body) + "." + closer
    return {"sentence": text, "label": "positive" if positive else "negative"}


# --- paraphrase ---------------------------------------------------------------------

_NAMES = [
    "Maria", "Tom", "Aisha", "Kenji", "Lucas", "Priya", "Omar", "Elena", "Noah", "Sofia",
    "Liam", "Chen", "Fatima", "Diego", "Hannah", "Ivan", "Zara", "Mateo", "Grace", "Yusuf",
    "Nora", "Felix", "Amara", "Leo", "Mei", "Oscar", "Ruth", "Samuel", "Tara", "Victor",
]
# Each action: its wordings as (active past tense, passive participle or None).
_ACTIONS = [
    [("bought", "bought"), ("purchased", "purchased"), ("picked up", None)],
    [("sold", "sold"), ("got rid of", None)],
    [("fixed", "fixed"), ("repaired", "repaired"), ("mended", "mended")],
    [("carried", "carried"), ("hauled", "hauled")],
    [("cleaned", "cleaned"), ("washed", "washed"), ("scrubbed", "scrubbed")],
    [("ordered", "ordered"), ("requested", "requested")],
    [("delivered", "delivered"), ("dropped off", "dropped off"), ("brought over", None)],
    [("found", "found"), ("discovered", "discovered"), ("came across", None)],
    [("packed", "packed"), ("boxed up", "boxed up")],
    [("lost", "lost"), ("misplaced", "misplaced")],
    [("painted", "painted"), ("repainted", "repainted")],
    [("borrowed", "borrowed"), ("took out on loan", None)],
    [("counted", "counted"), ("tallied", "tallied")],
    [("photographed", "photographed"), ("took pictures of", None)],
]
_OBJECTS = [
    ["books", "novels"], ["chairs", "seats"], ["bikes", "bicycles"], ["lamps", "lights"],
    ["boxes", "crates", "cartons"], ["cups", "mugs"], ["shirts", "tops"],
    ["laptops", "notebook computers"], ["plants", "potted plants"], ["bottles", "flasks"],
    ["rugs", "carpets"], ["boats", "small boats"], ["kites"], ["maps", "charts"],
    ["jars", "glass jars"], ["phones", "mobile phones", "cellphones"], ["cars", "automobiles"],
    ["sofas", "couches"], ["jackets", "coats"], ["hats", "caps"],
    ["pictures", "photos", "photographs"], ["buckets", "pails"], ["tables", "desks"],
    ["gifts", "presents"], ["suitcases", "bags"], ["guitars"], ["clocks", "watches"],
    ["paintings", "canvases"],
]
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                 8: "eight", 9: "nine", 10: "ten", 11: "eleven", 12: "twelve"}
_PLACES = [
    ["at the market", "at the marketplace"], ["in the garage"], ["at the school", "at school"],
    ["at the office", "at work"], ["in the old barn", "in the barn"], ["at the harbor",
    "at the port"], ["downtown", "in the city center"], ["at the fair", "at the county fair"],
    ["near the station", "by the station"], ["at the shop", "at the store"],
    ["in the basement", "downstairs"], ["at the warehouse", "in the warehouse"],
]
_DAYS = [["on Monday", "Monday"], ["on Tuesday", "Tuesday"], ["on Wednesday", "Wednesday"],
         ["on Thursday", "Thursday"], ["on Friday", "Friday"], ["on Saturday", "Saturday"],
         ["on Sunday", "Sunday"], ["yesterday"], ["last week"], ["this morning"],
         ["last night", "yesterday evening"]]
_TEMPLATES = [
    "{name} {verb} {num} {obj} {place} {day}.", "{day}, {name} {verb} {num} {obj} {place}.",
    "{place}, {name} {verb} {num} {obj} {day}.", "it was {name} who {verb} {num} {obj} {place} {day}.",
    "{day}, {place}, {name} {verb} {num} {obj}.",
    # passive voice: the verb is a participle
    "{num} {obj} were {verb} by {name} {place} {day}.", "{day}, {num} {obj} were {verb} by {name} {place}.",
]


@dataclass(frozen=True)
class _Event:
    """The facts a paraphrase sentence states."""

    name: str
    action: int
    obj: int
    number: int
    place: int
    day: int


@dataclass(frozen=True)
class _Wording:
    """How an event is said: a template and which synonym fills each slot.

    Synonym choices are taken modulo the slot's number of wordings, so one wording fits
    any event.
    """

    template: int
    verb: int
    obj: int
    place: int
    day: int
    number_as_word: bool


def _random_event(rng: np.random.Generator) -> _Event:
    return _Event(_pick(rng, _NAMES), int(rng.integers(len(_ACTIONS))), int(rng.integers(len(_OBJECTS))),
                  int(rng.integers(2, 13)), int(rng.integers(len(_PLACES))), int(rng.integers(len(_DAYS))))


def _random_wording(rng: np.random.Generator) -> _Wording:
    return _Wording(int(rng.integers(len(_TEMPLATES))), *(int(v) for v in rng.integers(0, 6, size=4)),
                    number_as_word=bool(rng.random() < 0.5))


def _slot_words(event: _Event, wording: _Wording, slot: str) -> list[str]:
    """The ways `slot` of `event` can be said in `wording`'s template."""
    if slot == "verb":
        passive = "were {verb}" in _TEMPLATES[wording.template]
        # phrasal verbs ("picked up") have no passive here
        return [participle for _, participle in _ACTIONS[event.action] if participle] if passive \
            else [active for active, _ in _ACTIONS[event.action]]
    return {"obj": _OBJECTS[event.obj], "place": _PLACES[event.place], "day": _DAYS[event.day]}[slot]


def _slot_word(event: _Event, wording: _Wording, slot: str) -> str:
    words = _slot_words(event, wording, slot)
    return words[getattr(wording, slot) % len(words)]


def _render_event(event: _Event, wording: _Wording) -> str:
    return _sentence(_TEMPLATES[wording.template].format(
        name=event.name, verb=_slot_word(event, wording, "verb"),
        num=_NUMBER_WORDS[event.number] if wording.number_as_word else str(event.number),
        obj=_slot_word(event, wording, "obj"), place=_slot_word(event, wording, "place"),
        day=_slot_word(event, wording, "day")))


def _restated(rng: np.random.Generator, first: tuple[_Event, _Wording], event: _Event,
              synonyms: int) -> _Wording:
    """Wording for `event` that restates `first`: often another word order, and up to
    `synonyms` of the verb, place and time said with a different synonym.

    The key facts keep their words (the object its synonym, the number its form: "3"
    against "three") so that what changes in a negative stands out from a rewording
    to a small encoder trained on 600 pairs.
    """
    first_event, first_wording = first
    wording = first_wording
    if rng.random() < 0.6:
        wording = replace(wording, template=_other(rng, range(len(_TEMPLATES)), wording.template))
    changeable = [slot for slot in ("verb", "place", "day") if any(
        w != _slot_word(first_event, first_wording, slot) for w in _slot_words(event, wording, slot))]
    chosen = [str(slot) for slot in rng.permutation(changeable)[:synonyms]] if changeable else []
    for slot in chosen:
        old = _slot_word(first_event, first_wording, slot)
        words = _slot_words(event, wording, slot)
        index = _pick(rng, [i for i, w in enumerate(words) if w != old])
        wording = replace(wording, **{slot: index})
    return wording


def _changed_event(rng: np.random.Generator, event: _Event) -> _Event:
    """The same event with one key fact changed: who, to what, or how many.

    The action is never the changed fact: verbs are where restatements use synonyms, and
    telling "cleaned"/"painted" from "cleaned"/"washed" is more than a small encoder
    learns from 600 pairs.
    """
    fact = _pick(rng, ("name", "obj", "number"))
    if fact == "name":
        return replace(event, name=_other(rng, _NAMES, event.name))
    if fact == "obj":
        return replace(event, obj=_other(rng, range(len(_OBJECTS)), event.obj))
    return replace(event, number=_other(rng, range(2, 13), event.number))


def _make_paraphrase(rng: np.random.Generator, target: int) -> dict:
    event, wording = _random_event(rng), _random_wording(rng)
    first = _render_event(event, wording)
    # Restatements swap one or two words for synonyms; a negative changes one fact plus
    # zero or one synonym, so both classes differ from `first` by one or two words and
    # counting common words says little about the label.
    changes = int(rng.integers(1, 3))
    second_event = event if target == 1 else _changed_event(rng, event)
    synonyms = changes if target == 1 else changes - 1
    second = first
    while second == first:
        second = _render_event(second_event, _restated(rng, (event, wording), second_event, synonyms))
    return {"sentence1": first, "sentence2": second, "label": target}


# --- similarity ---------------------------------------------------------------------

# A scene attribute is a tuple of parts (e.g. trait and noun); a part is a list of
# synonyms. Different values share parts ("an old man", "a young man"), so counting
# common words is a poor estimate of how many attributes two scenes share.
_SUBJECT_PARTS = (
    [("",), ("young",), ("old", "elderly"), ("tall",), ("smiling", "grinning"), ("tired", "weary")],
    [("man", "guy", "gentleman"), ("woman", "lady"), ("boy", "lad"), ("girl",), ("chef", "cook"),
     ("student", "pupil"), ("teacher", "instructor"), ("police officer", "cop"),
     ("doctor", "physician"), ("musician", "performer"), ("farmer",), ("nurse",),
     ("tourist", "traveler", "visitor"), ("painter", "artist")],
)
_ACTIVITY_PARTS = (
    [("holding", "gripping"), ("carrying", "lugging"), ("looking at", "staring at"),
     ("throwing", "tossing"), ("buying", "purchasing"), ("painting", "coloring"),
     ("cleaning", "washing"), ("fixing", "repairing"), ("selling",), ("drawing", "sketching"),
     ("dropping",), ("kicking",), ("pushing", "shoving"), ("pulling", "dragging"),
     ("picking up", "lifting"), ("wrapping",), ("photographing", "taking a picture of"),
     ("catching", "grabbing"), ("hiding", "concealing"), ("sharing",)],
)
_THING_PARTS = (
    [("",), ("red",), ("blue",), ("green",), ("small", "little"), ("big", "large")],
    [("ball",), ("book", "novel"), ("umbrella", "parasol"), ("guitar",), ("bag", "backpack"),
     ("cup", "mug"), ("box", "crate"), ("bicycle", "bike"), ("kite",), ("basket", "hamper"),
     ("hat", "cap"), ("lamp", "light"), ("chair", "seat"), ("map", "chart"), ("bottle", "flask"),
     ("phone", "cellphone"), ("suitcase",), ("ladder",), ("camera",), ("drum",),
     ("pillow", "cushion"), ("bucket", "pail"), ("rope", "cord"), ("blanket",)],
)
# Places carry their prepositions: the noun decides between "in", "on" and "near".
_PLACE_PARTS = (
    [("",), ("busy", "crowded"), ("quiet", "calm"), ("small", "little"), ("big", "large")],
    [(("in", "park"), ("at", "park")), (("in", "kitchen"),), (("on", "street"), ("on", "road")),
     (("near", "river"), ("by", "river")), (("near", "lake"), ("by", "lake")),
     (("in", "classroom"),), (("in", "office"),), (("at", "train station"), ("in", "train station")),
     (("in", "garden"), ("in", "backyard")), (("on", "bridge"),), (("in", "forest"), ("in", "woodland")),
     (("in", "library"),), (("at", "market"), ("in", "market")), (("on", "boat"),),
     (("in", "hospital"),), (("on", "rooftop"), ("on", "roof")), (("in", "parking lot"),),
     (("at", "airport"),), (("in", "museum"),), (("in", "cafe"), ("in", "coffee shop"))],
)
_TIME_PARTS = (
    [("rainy", "wet"), ("sunny", "bright"), ("cold", "chilly"), ("foggy", "misty"), ("warm",),
     ("windy",), ("quiet",)],
    [("morning",), ("afternoon",), ("evening",), ("night",), ("weekend",)],
)
_ATTRIBUTES = (_SUBJECT_PARTS, _ACTIVITY_PARTS, _THING_PARTS, _PLACE_PARTS, _TIME_PARTS)
_SCENE_TEMPLATES = [
    "{s} is {a} {o} {p} {t}.", "{t}, {s} is {a} {o} {p}.", "{p}, {s} is {a} {o} {t}.",
    "{s} can be seen {a} {o} {p} {t}.", "there is {s} {a} {o} {p} {t}.",
    "{t}, {p}, {s} is {a} {o}.", "{s} {p} is {a} {o} {t}.",
]


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _say(attribute: int, value: tuple[int, ...], synonyms: tuple[int, ...]) -> str:
    """The wording of an attribute value with the given synonym of each part."""
    words = [parts[i][j] for parts, i, j in zip(_ATTRIBUTES[attribute], value, synonyms)]
    if attribute in (0, 2):  # subject, thing: "an old man", "a red ball"
        return _with_article(" ".join(w for w in words if w))
    if attribute == 3:  # place: "in a busy park"
        trait, (preposition, noun) = words
        return f"{preposition} {_with_article(f'{trait} {noun}'.strip())}"
    if attribute == 4:  # time: "on a rainy morning"
        return "on " + _with_article(" ".join(words))
    return words[0]


def _synonyms(rng: np.random.Generator, attribute: int, value: tuple[int, ...],
              unlike: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Random synonym choices for `value`; mostly other words than `unlike` where a part
    has several, so a shared attribute often shares no words."""
    choices = []
    for k, (parts, i) in enumerate(zip(_ATTRIBUTES[attribute], value)):
        count = len(parts[i])
        if unlike is not None and count > 1 and rng.random() < 0.6:
            choices.append(_other(rng, range(count), unlike[k]))
        else:
            choices.append(int(rng.integers(count)))
    return tuple(choices)


def _random_value(rng: np.random.Generator, attribute: int) -> tuple[int, ...]:
    return tuple(int(rng.integers(len(p))) for p in _ATTRIBUTES[attribute])


def _other_value(rng: np.random.Generator, attribute: int, value: tuple[int, ...]) -> tuple[int, ...]:
    """A different value, a quarter of the time one that differs in one part only (so it
    shares words with `value`)."""
    parts = _ATTRIBUTES[attribute]
    if len(parts) > 1 and rng.random() < 0.25:
        k = int(rng.integers(len(parts)))
        return value[:k] + (_other(rng, range(len(parts[k])), value[k]),) + value[k + 1:]
    other = value
    while other == value:
        other = _random_value(rng, attribute)
    return other


def _render_scene(rng: np.random.Generator, phrases: list[str]) -> str:
    s, a, o, p, t = phrases
    return _sentence(_pick(rng, _SCENE_TEMPLATES).format(s=s, a=a, o=o, p=p, t=t))


def _make_similarity(rng: np.random.Generator, shared: int) -> dict:
    attributes = range(len(_ATTRIBUTES))
    first = [_random_value(rng, k) for k in attributes]
    same = set(rng.choice(len(_ATTRIBUTES), size=shared, replace=False).tolist())
    second = [first[k] if k in same else _other_value(rng, k, first[k]) for k in attributes]
    first_words = [_synonyms(rng, k, first[k]) for k in attributes]
    second_words = [_synonyms(rng, k, second[k], first_words[k] if k in same else None)
                    for k in attributes]
    # Like human STS ratings: the attribute share, plus a little disagreement.
    score = 5.0 * shared / len(_ATTRIBUTES) + rng.normal(0.0, 0.25)
    return {"sentence1": _render_scene(rng, [_say(k, first[k], first_words[k]) for k in attributes]),
            "sentence2": _render_scene(rng, [_say(k, second[k], second_words[k]) for k in attributes]),
            "score": round(float(np.clip(score, 0.0, 5.0)), 3)}


_MAKERS: dict[str, Callable[[np.random.Generator, int], dict]] = {
    "sentiment": _make_sentiment, "paraphrase": _make_paraphrase, "similarity": _make_similarity,
}
# How many targets are dealt evenly: two classes, or 0..5 shared attributes.
_TARGETS = {"sentiment": 2, "paraphrase": 2, "similarity": len(_ATTRIBUTES) + 1}
