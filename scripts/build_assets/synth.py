"""Deterministic synthetic data: a small generated "world" of facts, and arithmetic.

Everything here is driven by a seeded :class:`random.Random`, so the same arguments always
give the same output on every machine (no numpy, no hashing of strings).

Two families of data:

* **Arithmetic** -- two-operand ``plus`` / ``minus`` problems with operands of a fixed
  number of digits (2 digits: 10..99, 4 digits: 1000..9999). ``minus`` problems always put
  the larger operand first, so every answer is ``>= 0`` (no negative numbers anywhere).
  :func:`arithmetic_examples` gives Alpaca records (``"What is 59 minus 38?"`` -> ``"21"``);
  :func:`arithmetic_corpus` gives the same knowledge in other surface forms (equations,
  sentences, question/answer lines) for pretraining.
* **The world** -- a fixed set of invented countries with capitals, cities, languages,
  rivers, animals, exports and the trades of their towns, built by :func:`make_world` (always
  with the same world seed, so every task speaks about the same world).
  :func:`world_corpus` gives pretraining documents (fact lists, short stories, Q/A lines and
  Alpaca-formatted instructions answered in full sentences), :func:`world_mc_task` gives
  multiple-choice questions in the TruthfulQA ``mc_task.json`` layout, and
  :func:`world_minimal_pairs` gives BLiMP-style grammatical/ungrammatical sentence pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

WORLD_SEED = 1729  # the world itself never changes; task seeds only pick from it

# --------------------------------------------------------------------------- arithmetic

_OP_SYMBOL = {"plus": "+", "minus": "-"}


def _digit_range(digits: int) -> tuple[int, int]:
    if digits < 1:
        raise ValueError("digits must be >= 1")
    lo = 10 ** (digits - 1) if digits > 1 else 0
    return lo, 10**digits - 1


def _problem(rng: random.Random, digits: int, ops: tuple[str, ...]) -> tuple[int, str, int]:
    lo, hi = _digit_range(digits)
    op = rng.choice(ops)
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if op == "minus" and b > a:
        a, b = b, a  # keep every result >= 0
    elif op not in _OP_SYMBOL:
        raise ValueError(f"unknown op {op!r}; use 'plus' or 'minus'")
    return a, op, b


def _answer(a: int, op: str, b: int) -> int:
    return a + b if op == "plus" else a - b


def arithmetic_problems(
    digits: int, n: int, seed: int, ops=("plus", "minus"), exclude: set | frozenset = frozenset()
) -> list[tuple[int, str, int]]:
    """``n`` distinct ``(a, op, b)`` problems, none of them in ``exclude``."""
    ops = tuple(ops)
    lo, hi = _digit_range(digits)
    span = hi - lo + 1
    capacity = sum(span * span if op == "plus" else span * (span + 1) // 2 for op in set(ops))
    if n > capacity - len(exclude):
        raise ValueError(f"only {capacity} distinct {digits}-digit problems exist; asked for {n}")
    rng = random.Random(seed)
    seen: set = set(exclude)
    out = []
    while len(out) < n:
        p = _problem(rng, digits, ops)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def problem_record(a: int, op: str, b: int) -> dict:
    """The Alpaca record for one problem."""
    return {"instruction": f"What is {a} {op} {b}?", "input": "", "output": str(_answer(a, op, b))}


def arithmetic_examples(digits: int, n: int, seed: int, ops=("plus", "minus")) -> list[dict]:
    """``n`` distinct Alpaca records like ``{"instruction": "What is 59 minus 38?", "input": "",
    "output": "21"}``; operands have exactly ``digits`` digits and ``minus`` results are >= 0."""
    return [problem_record(*p) for p in arithmetic_problems(digits, n, seed, ops)]


def parse_problem(instruction: str) -> tuple[int, str, int]:
    """Inverse of :func:`problem_record`'s instruction (``"What is 59 minus 38?"``)."""
    words = instruction.rstrip("?").split()
    return int(words[2]), words[3], int(words[4])


def _arith_line(rng: random.Random, a: int, op: str, b: int) -> str:
    c = _answer(a, op, b)
    sym = _OP_SYMBOL[op]
    form = rng.randrange(6)
    if form == 0:
        return f"{a} {sym} {b} = {c}"
    if form == 1:
        return f"{a} {op} {b} is {c}."
    if form == 2:
        return f"{a} {op} {b} equals {c}."
    if form == 3:
        return f"Q: {a} {sym} {b} = ?\nA: {c}"
    if form == 4:
        return (
            f"The sum of {a} and {b} is {c}."
            if op == "plus"
            else f"The difference between {a} and {b} is {c}."
        )
    return f"{a} {sym} {b} = {c}."


def arithmetic_corpus(
    n_docs: int,
    seed: int,
    digits=(2, 4),
    ops=("plus", "minus"),
    exclude: set | frozenset = frozenset(),
    lines_per_doc=(4, 10),
) -> list[str]:
    """Pretraining documents that state arithmetic facts in surface forms *other* than the
    Alpaca instruction format: ``59 - 38 = 21``, ``59 minus 38 is 21.``, ``2762 plus 2751
    equals 5513.``, ``Q: 59 - 38 = ?`` / ``A: 21`` ... Problems in ``exclude`` (held-out
    evaluation problems as ``(a, op, b)``) never appear."""
    rng = random.Random(seed)
    ops = tuple(ops)
    docs = []
    for _ in range(n_docs):
        d = rng.choice(digits)
        lines = []
        for _ in range(rng.randint(*lines_per_doc)):
            while True:
                p = _problem(rng, d, ops)
                if p not in exclude:
                    break
            lines.append(_arith_line(rng, *p))
        docs.append("\n".join(lines))
    return docs


# --------------------------------------------------------------------------- the world

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "st",
    "th",
    "tr",
    "sh",
    "ch",
    "vel",
    "or",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "n", "r", "l", "s", "k", "th", "sk", "nd", "rn"]
_COUNTRY_ENDS = ["ia", "and", "ora", "esh", "avia", "istan", "ur", "ona"]

ANIMALS = [
    "fox",
    "heron",
    "otter",
    "wolf",
    "lynx",
    "stag",
    "owl",
    "hare",
    "bear",
    "eagle",
    "badger",
    "swan",
    "falcon",
    "beaver",
    "crane",
    "boar",
]
EXPORTS = [
    "wool",
    "copper",
    "salt",
    "tea",
    "glass",
    "timber",
    "silver",
    "honey",
    "cheese",
    "paper",
    "iron",
    "rice",
    "wine",
    "silk",
    "amber",
    "cotton",
]
COLORS = ["red", "blue", "green", "white", "black", "yellow", "purple", "orange"]
# (singular, plural)
TRADES = [
    ("baker", "bakers"),
    ("weaver", "weavers"),
    ("fisher", "fishers"),
    ("potter", "potters"),
    ("miner", "miners"),
    ("farmer", "farmers"),
    ("singer", "singers"),
    ("sailor", "sailors"),
    ("builder", "builders"),
    ("painter", "painters"),
    ("smith", "smiths"),
    ("merchant", "merchants"),
]
ADJECTIVES = [
    "kind",
    "proud",
    "tall",
    "quiet",
    "brave",
    "clever",
    "cheerful",
    "patient",
    "honest",
    "busy",
    "gentle",
    "loud",
]
VERBS = [
    ("sings", "sing"),
    ("works", "work"),
    ("travels", "travel"),
    ("trades", "trade"),
    ("sleeps", "sleep"),
    ("laughs", "laugh"),
]
FIRST_NAMES = [
    "Mira",
    "Toma",
    "Ilsa",
    "Joren",
    "Petra",
    "Anko",
    "Lusa",
    "Bren",
    "Dalia",
    "Orrin",
    "Sefa",
    "Kalo",
    "Nerin",
    "Ulla",
    "Vesko",
    "Rada",
    "Tamsin",
    "Gero",
    "Ysolde",
    "Faro",
]


@dataclass
class Country:
    name: str
    capital: str
    cities: list[str]  # capital first
    language: str
    river: str
    animal: str
    export: str
    color: str


@dataclass
class World:
    countries: list[Country]
    # city -> (trade index, adjective) : "The bakers of Tolsk are kind."
    city_trade: dict[str, tuple[int, str]]
    city_country: dict[str, str]
    people: list[tuple[str, str, int]] = field(default_factory=list)  # (name, city, trade index)


def _word(rng: random.Random, syllables: int) -> str:
    w = ""
    for i in range(syllables):
        w += rng.choice(_ONSETS) + rng.choice(_VOWELS)
        if i == syllables - 1:
            w += rng.choice(_CODAS)
    return w.capitalize()


_WORLD_CACHE: dict[tuple[int, int], World] = {}


def make_world(n_countries: int = 24, seed: int = WORLD_SEED) -> World:
    """The generated world (cached; the default arguments give *the* loralab world)."""
    key = (n_countries, seed)
    if key in _WORLD_CACHE:
        return _WORLD_CACHE[key]
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(make) -> str:
        while True:
            w = make()
            if w not in used and 3 <= len(w) <= 10:
                used.add(w)
                return w

    countries = []
    for _ in range(n_countries):
        while True:
            stem = _word(rng, rng.randint(1, 2))
            name = stem + rng.choice(_COUNTRY_ENDS)
            if stem not in used and name not in used and len(name) <= 11:
                used.update((stem, name))
                break
        cities = [fresh(lambda: _word(rng, rng.randint(1, 2))) for _ in range(3)]
        language = stem + rng.choice(["ic", "ish", "ese", "i"])
        used.add(language)
        river = fresh(lambda: _word(rng, rng.randint(1, 2)))
        countries.append(
            Country(
                name=name,
                capital=cities[0],
                cities=cities,
                language=language,
                river=river,
                animal=rng.choice(ANIMALS),
                export=rng.choice(EXPORTS),
                color=rng.choice(COLORS),
            )
        )
    city_trade, city_country = {}, {}
    for c in countries:
        for city in c.cities:
            city_trade[city] = (rng.randrange(len(TRADES)), rng.choice(ADJECTIVES))
            city_country[city] = c.name
    all_cities = [city for c in countries for city in c.cities]
    people = [(name, rng.choice(all_cities), rng.randrange(len(TRADES))) for name in FIRST_NAMES]
    world = World(
        countries=countries, city_trade=city_trade, city_country=city_country, people=people
    )
    _WORLD_CACHE[key] = world
    return world


def _facts(world: World) -> list[tuple[str, str, str, str]]:
    """Every fact as ``(kind, question, sentence, short answer)``."""
    out = []
    for c in world.countries:
        out += [
            (
                "capital",
                f"What is the capital of {c.name}?",
                f"The capital of {c.name} is {c.capital}.",
                c.capital,
            ),
            (
                "language",
                f"What language do people speak in {c.name}?",
                f"People in {c.name} speak {c.language}.",
                c.language,
            ),
            (
                "river",
                f"Which river flows through {c.name}?",
                f"The river {c.river} flows through {c.name}.",
                c.river,
            ),
            (
                "animal",
                f"What is the national animal of {c.name}?",
                f"The national animal of {c.name} is the {c.animal}.",
                f"the {c.animal}",
            ),
            ("export", f"What does {c.name} export?", f"{c.name} exports {c.export}.", c.export),
            (
                "color",
                f"What color is the flag of {c.name}?",
                f"The flag of {c.name} is {c.color}.",
                c.color,
            ),
        ]
        for city in c.cities:
            out.append(
                ("country", f"In which country is {city}?", f"{city} is in {c.name}.", c.name)
            )
    for city, (t, adj) in world.city_trade.items():
        out.append(
            (
                "trade",
                f"What are the {TRADES[t][1]} of {city} like?",
                f"The {TRADES[t][1]} of {city} are {adj}.",
                adj,
            )
        )
    for name, city, _t in world.people:
        out.append(("person", f"Where does {name} live?", f"{name} lives in {city}.", city))
    return out


def _fact_sentences(rng: random.Random, world: World, c: Country) -> list[str]:
    s = [
        rng.choice(
            [f"The capital of {c.name} is {c.capital}.", f"{c.capital} is the capital of {c.name}."]
        ),
        rng.choice(
            [
                f"People in {c.name} speak {c.language}.",
                f"The language of {c.name} is {c.language}.",
            ]
        ),
        rng.choice(
            [
                f"The river {c.river} flows through {c.name}.",
                f"{c.name} lies on the river {c.river}.",
            ]
        ),
        rng.choice(
            [
                f"The national animal of {c.name} is the {c.animal}.",
                f"The {c.animal} is the national animal of {c.name}.",
            ]
        ),
        rng.choice(
            [f"{c.name} exports {c.export}.", f"The main export of {c.name} is {c.export}."]
        ),
        rng.choice([f"The flag of {c.name} is {c.color}.", f"{c.name} has a {c.color} flag."]),
    ]
    for city in c.cities[1:]:
        s.append(rng.choice([f"{city} is a town in {c.name}.", f"{city} is in {c.name}."]))
    for city in c.cities:
        s.append(_trade_sentence(rng, world, city))
    rng.shuffle(s)
    return s


def _trade_sentence(rng: random.Random, world: World, city: str) -> str:
    """A grammatical sentence about the trade of ``city``, singular or plural, with a
    determiner or verb, so the corpus teaches number agreement."""
    t, adj = world.city_trade[city]
    sg, pl = TRADES[t]
    vsg, vpl = rng.choice(VERBS)
    form = rng.randrange(6)
    if form == 0:
        return f"The {pl} of {city} are {adj}."
    if form == 1:
        return f"The {sg} of {city} is {adj}."
    if form == 2:
        return f"{rng.choice(['These', 'Those'])} {pl} of {city} {vpl} every day."
    if form == 3:
        return f"{rng.choice(['This', 'That'])} {sg} of {city} {vsg} every day."
    if form == 4:
        return f"{city} is known for its {adj} {pl}."
    return f"A {sg} from {city} is always {adj}."


def _story(rng: random.Random, world: World) -> str:
    name, city, t = rng.choice(world.people)
    country = next(c for c in world.countries if c.name == world.city_country[city])
    sg, pl = TRADES[t]
    other = rng.choice([c for c in world.countries if c is not country])
    ct, cadj = world.city_trade[city]
    lines = [
        f"{name} lives in {city}.",
        f"{name} is a {sg}.",
        f"{city} is in {country.name}."
        if city != country.capital
        else f"{city} is the capital of {country.name}.",
        f"Every morning {name} walks along the river {country.river}.",
        f"The {TRADES[ct][1]} of {city} are {cadj}, and {name} knows them all.",
        f"One day {name} travelled to {other.capital}, the capital of {other.name}.",
        f"There the people speak {other.language}, and {name} bought some {other.export}.",
        f"On the way home {name} saw a {country.animal}, the national animal of {country.name}.",
    ]
    keep = [lines[0], lines[1]] + [ln for ln in lines[2:] if rng.random() < 0.75]
    return " ".join(keep)


def _alpaca_world(rng: random.Random, world: World) -> str:
    """An Alpaca-formatted instruction about the world, answered in a full sentence."""
    from loralab.data.templates import ALPACA_NO_INPUT

    kind, question, sentence, _ = rng.choice(_facts(world))
    instruction = question
    if rng.random() < 0.25:
        c = rng.choice(world.countries)
        instruction = rng.choice(
            [f"Tell me one fact about {c.name}.", f"Describe {c.name} in one sentence."]
        )
        sentence = rng.choice(_fact_sentences(rng, world, c))
    return ALPACA_NO_INPUT.format(instruction=instruction) + sentence


def world_corpus(n_docs: int, seed: int) -> list[str]:
    """Pretraining documents about the world: fact lists, short stories, ``Q: ...`` / ``A: ...``
    lines and Alpaca-formatted instructions about the world answered in full sentences (never
    arithmetic -- the Alpaca format for arithmetic is left for fine-tuning to teach)."""
    world = make_world()
    facts = _facts(world)
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        kind = rng.random()
        if kind < 0.3:
            c = rng.choice(world.countries)
            docs.append(" ".join(_fact_sentences(rng, world, c)))
        elif kind < 0.5:
            docs.append(_story(rng, world))
        elif kind < 0.75:
            qa = rng.sample(facts, rng.randint(2, 5))
            docs.append("\n".join(f"Q: {q}\nA: {a}" for _k, q, _s, a in qa))
        else:
            docs.append(_alpaca_world(rng, world))
    return docs


def world_mc_task(n: int, seed: int) -> list[dict]:
    """``n`` multiple-choice questions about the world in the TruthfulQA ``mc_task.json``
    layout. ``mc1_targets`` has the true answer and three distractors of the same kind (other
    capitals, other languages, ...); ``mc2_targets`` adds a second true phrasing."""
    world = make_world()
    facts = [f for f in _facts(world) if f[0] != "person"]
    if n > len(facts):
        raise ValueError(f"the world has only {len(facts)} questions; asked for {n}")
    rng = random.Random(seed)
    picked = rng.sample(facts, n)
    pools: dict[str, list[str]] = {}
    for k, _q, _s, a in facts:
        pools.setdefault(k, [])
        if a not in pools[k]:
            pools[k].append(a)
    out = []
    for k, q, sentence, true in picked:
        wrong = rng.sample([a for a in pools[k] if a != true], 3)
        choices = [true] + wrong
        mc1 = {ch: int(ch == true) for ch in choices}
        mc2 = dict(mc1)
        mc2[sentence] = 1
        out.append({"question": q, "mc1_targets": mc1, "mc2_targets": mc2})
    return out


def world_minimal_pairs(n: int, seed: int) -> list[dict]:
    """``n`` BLiMP-style pairs ``{"good", "bad", "phenomenon"}`` over the world's vocabulary:
    ``subject_verb_agreement`` ("The bakers of Tolsk are kind." / "... is kind."),
    ``determiner_noun_agreement`` ("These bakers of Tolsk sing every day." / "This bakers
    ...") and ``word_order`` ("The bakers of Tolsk are kind." / "The bakers of Tolsk kind are.")."""
    world = make_world()
    cities = sorted(world.city_trade)
    rng = random.Random(seed)
    out, seen = [], set()
    guard = 0
    while len(out) < n:
        guard += 1
        if guard > 100 * n + 1000:
            raise ValueError(f"could not make {n} distinct pairs")
        city = rng.choice(cities)
        t, adj = world.city_trade[city]
        sg, pl = TRADES[t]
        vsg, vpl = rng.choice(VERBS)
        phen = rng.choice(["subject_verb_agreement", "determiner_noun_agreement", "word_order"])
        plural = rng.random() < 0.5
        if phen == "subject_verb_agreement":
            if plural:
                good, bad = f"The {pl} of {city} are {adj}.", f"The {pl} of {city} is {adj}."
            else:
                good, bad = f"The {sg} of {city} is {adj}.", f"The {sg} of {city} are {adj}."
        elif phen == "determiner_noun_agreement":
            i = rng.randrange(2)
            dsg, dpl = ("This", "These") if i == 0 else ("That", "Those")
            if plural:
                good, bad = (
                    f"{dpl} {pl} of {city} {vpl} every day.",
                    f"{dsg} {pl} of {city} {vpl} every day.",
                )
            else:
                good, bad = (
                    f"{dsg} {sg} of {city} {vsg} every day.",
                    f"{dpl} {sg} of {city} {vsg} every day.",
                )
        else:
            noun, be = (pl, "are") if plural else (sg, "is")
            good, bad = f"The {noun} of {city} {be} {adj}.", f"The {noun} of {city} {adj} {be}."
        if good in seen:
            continue
        seen.add(good)
        out.append({"good": good, "bad": bad, "phenomenon": phen})
    return out
