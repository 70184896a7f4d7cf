"""The synthetic world's language: scene objects, English and French word tables, and the
renderers that turn a scene into short captions, a long caption, questions and corpus sentences.

Word choices come from a `Picker`: a choice is a hash of (seed, key), and keys name values, not
slots ("color/red"). Two scenes rendered with the same seed therefore use the same template and
the same synonym for each value, so attribute-swapped twins get captions with the same words.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

T = TypeVar("T")

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white")
SIZES = ("small", "medium", "large")  # by salience: the main object is large, the second medium, the rest small
BACKGROUNDS = ("gray", "blue", "green", "brown")  # dark tones
# Cells of the 3x3 grid, row-major.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cell: int  # index into POSITIONS

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # the main (largest) object first, then the second largest, then the rest
    relation: str | None  # where objects[0] lies relative to objects[1]
    background: str  # one of BACKGROUNDS
    twin_kind: str | None = None  # "color" or "position" when the scene has a swapped twin


def relation(a: Obj, b: Obj, vertical: bool) -> str:
    """Where `a` lies relative to `b`; `vertical` picks the axis when both rows and columns differ."""
    if a.col == b.col or (vertical and a.row != b.row):
        return "above" if a.row < b.row else "below"
    return "left" if a.col < b.col else "right"


class Picker:
    """Deterministic choices keyed by name: the same seed and key always give the same answer."""

    def __init__(self, seed: str):
        self.seed = seed

    def _hash(self, key: str) -> int:
        digest = hashlib.blake2b(f"{self.seed}|{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def pick(self, key: str, options: Sequence[T]) -> T:
        return options[self._hash(key) % len(options)]

    def order(self, key: str, names: Sequence[str]) -> list[str]:
        return sorted(names, key=lambda name: self._hash(f"{key}|{name}"))

    def chance(self, key: str, p: float) -> bool:
        return self._hash(key) % 10_000 < p * 10_000


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


class English:
    colors: ClassVar[dict[str, list[str]]] = {
        "red": ["red", "crimson", "scarlet"],
        "orange": ["orange", "amber", "tangerine"],
        "yellow": ["yellow", "golden", "lemon"],
        "green": ["green", "emerald", "jade"],
        "blue": ["blue", "azure", "cobalt"],
        "purple": ["purple", "violet", "plum"],
        "pink": ["pink", "rose", "fuchsia"],
        "white": ["white", "ivory", "snowy"],
    }
    shapes: ClassVar[dict[str, list[str]]] = {
        "circle": ["circle", "disc", "round shape"],
        "square": ["square", "box", "block"],
        "triangle": ["triangle", "wedge", "three-sided shape"],
        "star": ["star", "five-pointed star"],
        "hexagon": ["hexagon", "six-sided shape"],
        "cross": ["cross", "plus sign"],
    }
    sizes: ClassVar[dict[str, list[str]]] = {
        "small": ["small", "little", "tiny"],
        "medium": ["medium", "medium-sized", "mid-sized"],
        "large": ["large", "big", "huge"],
    }
    positions: ClassVar[dict[str, list[str]]] = {
        "top left": ["in the top left corner", "at the upper left", "in the top-left area"],
        "top": ["at the top", "at the top center", "in the upper middle"],
        "top right": ["in the top right corner", "at the upper right", "in the top-right area"],
        "left": ["on the left", "at the middle left", "on the left side"],
        "center": ["in the center", "in the middle", "at the very center"],
        "right": ["on the right", "at the middle right", "on the right side"],
        "bottom left": ["in the bottom left corner", "at the lower left", "in the bottom-left area"],
        "bottom": ["at the bottom", "at the bottom center", "in the lower middle"],
        "bottom right": ["in the bottom right corner", "at the lower right", "in the bottom-right area"],
    }
    relations: ClassVar[dict[str, list[str]]] = {
        "left": ["to the left of", "left of", "on the left side of"],
        "right": ["to the right of", "right of", "on the right side of"],
        "above": ["above", "over", "higher than"],
        "below": ["below", "beneath", "under", "lower than"],
    }
    numbers: ClassVar[list[str]] = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    backgrounds: ClassVar[dict[str, list[str]]] = {
        "gray": ["dark gray", "charcoal", "dark grey"],
        "blue": ["dark blue", "navy", "midnight blue"],
        "green": ["dark green", "forest green", "deep green"],
        "brown": ["dark brown", "chocolate", "deep brown"],
    }

    def _noun(self, obj: Obj, p: Picker, sized: bool) -> str:
        words = [p.pick(f"color/{obj.color}", self.colors[obj.color]), p.pick(f"shape/{obj.shape}", self.shapes[obj.shape])]
        if sized:
            words.insert(0, p.pick(f"size/{obj.size}", self.sizes[obj.size]))
        return " ".join(words)

    def a(self, obj: Obj, p: Picker, sized: bool = False) -> str:
        noun = self._noun(obj, p, sized)
        return ("an " if noun[0] in "aeiou" else "a ") + noun

    def the(self, obj: Obj, p: Picker, sized: bool = False) -> str:
        return "the " + self._noun(obj, p, sized)

    def bare(self, obj: Obj, p: Picker) -> str:
        return self._noun(obj, p, sized=False)

    def fem(self, obj: Obj, p: Picker) -> str:
        return ""

    def rel(self, name: str, target: str, p: Picker) -> str:
        return f"{p.pick(f'rel/{name}', self.relations[name])} {target}"

    def position(self, obj: Obj, p: Picker) -> str:
        return p.pick(f"pos/{obj.cell}", self.positions[obj.position])

    def count(self, n: int, p: Picker) -> str:
        return p.pick(f"count/{n}", [self.numbers[n - 1], str(n)])

    def background(self, name: str, p: Picker) -> str:
        return p.pick(f"background/{name}", self.backgrounds[name])


_FR_VOWELS = "aeiouhéèêâîôû"


def _fr_join(prep: str, phrase: str) -> str:
    """French preposition + noun phrase with the contractions: de le -> du, de un -> d'un, que un -> qu'un."""
    if prep == "de" or prep.endswith(" de"):
        head = prep[:-2]
        if phrase.startswith("le "):
            return f"{head}du {phrase[3:]}"
        if phrase[0] in _FR_VOWELS:
            return f"{head}d'{phrase}"
    if prep.endswith("que") and phrase[0] in _FR_VOWELS:
        return f"{prep[:-1]}'{phrase}"
    return f"{prep} {phrase}"


class French:
    colors: ClassVar[dict[str, list[tuple[str, str]]]] = {  # (masculine, feminine)
        "red": [("rouge", "rouge"), ("écarlate", "écarlate"), ("vermillon", "vermillon")],
        "orange": [("orange", "orange"), ("ambré", "ambrée"), ("mandarine", "mandarine")],
        "yellow": [("jaune", "jaune"), ("doré", "dorée"), ("citron", "citron")],
        "green": [("vert", "verte"), ("émeraude", "émeraude"), ("jade", "jade")],
        "blue": [("bleu", "bleue"), ("azur", "azur"), ("cobalt", "cobalt")],
        "purple": [("violet", "violette"), ("mauve", "mauve"), ("prune", "prune")],
        "pink": [("rose", "rose"), ("fuchsia", "fuchsia")],
        "white": [("blanc", "blanche"), ("ivoire", "ivoire"), ("neigeux", "neigeuse")],
    }
    shapes: ClassVar[dict[str, list[tuple[str, str, str]]]] = {  # (noun, gender, words that follow the colour)
        "circle": [("cercle", "m", ""), ("disque", "m", ""), ("rond", "m", "")],
        "square": [("carré", "m", ""), ("bloc", "m", "")],
        "triangle": [("triangle", "m", ""), ("forme", "f", " à trois côtés")],
        "star": [("étoile", "f", ""), ("étoile", "f", " à cinq branches")],
        "hexagon": [("hexagone", "m", ""), ("forme", "f", " à six côtés")],
        "cross": [("croix", "f", ""), ("signe plus", "m", "")],
    }
    sizes: ClassVar[dict[str, list[tuple[str, str, bool]]]] = {  # (masculine, feminine, placed before the noun)
        "small": [("petit", "petite", True), ("minuscule", "minuscule", False)],
        "medium": [("moyen", "moyenne", False), ("de taille moyenne", "de taille moyenne", False)],
        "large": [("grand", "grande", True), ("gros", "grosse", True)],
    }
    positions: ClassVar[dict[str, list[str]]] = {
        "top left": ["en haut à gauche", "dans le coin supérieur gauche"],
        "top": ["en haut", "en haut au centre"],
        "top right": ["en haut à droite", "dans le coin supérieur droit"],
        "left": ["à gauche", "au milieu à gauche"],
        "center": ["au centre", "au milieu"],
        "right": ["à droite", "au milieu à droite"],
        "bottom left": ["en bas à gauche", "dans le coin inférieur gauche"],
        "bottom": ["en bas", "en bas au centre"],
        "bottom right": ["en bas à droite", "dans le coin inférieur droit"],
    }
    relations: ClassVar[dict[str, list[str]]] = {
        "left": ["à gauche de", "sur la gauche de"],
        "right": ["à droite de", "sur la droite de"],
        "above": ["au-dessus de"],
        "below": ["au-dessous de", "en dessous de", "sous"],
    }
    numbers: ClassVar[list[str]] = ["une", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"]
    backgrounds: ClassVar[dict[str, list[str]]] = {
        "gray": ["gris foncé", "anthracite"],
        "blue": ["bleu foncé", "bleu nuit"],
        "green": ["vert foncé", "vert sapin"],
        "brown": ["brun foncé", "chocolat"],
    }

    def _noun(self, obj: Obj, p: Picker, sized: bool) -> tuple[str, bool]:
        noun, gender, tail = p.pick(f"shape/{obj.shape}", self.shapes[obj.shape])
        feminine = gender == "f"
        color = p.pick(f"color/{obj.color}", self.colors[obj.color])[feminine]
        before, after = [], []
        if sized:
            masc, fem, in_front = p.pick(f"size/{obj.size}", self.sizes[obj.size])
            (before if in_front else after).append(fem if feminine else masc)
        return " ".join([*before, noun, color + tail, *after]), feminine

    def a(self, obj: Obj, p: Picker, sized: bool = False) -> str:
        noun, feminine = self._noun(obj, p, sized)
        return ("une " if feminine else "un ") + noun

    def the(self, obj: Obj, p: Picker, sized: bool = False) -> str:
        noun, feminine = self._noun(obj, p, sized)
        if noun[0] in _FR_VOWELS:
            return "l'" + noun
        return ("la " if feminine else "le ") + noun

    def bare(self, obj: Obj, p: Picker) -> str:
        return self._noun(obj, p, sized=False)[0]

    def fem(self, obj: Obj, p: Picker) -> str:
        """The feminine ending "e" when the chosen noun is feminine (for "un{e} seul{e}")."""
        return "e" if self._noun(obj, p, sized=False)[1] else ""

    def rel(self, name: str, target: str, p: Picker) -> str:
        return _fr_join(p.pick(f"rel/{name}", self.relations[name]), target)

    def position(self, obj: Obj, p: Picker) -> str:
        return p.pick(f"pos/{obj.cell}", self.positions[obj.position])

    def count(self, n: int, p: Picker) -> str:
        return p.pick(f"count/{n}", [self.numbers[n - 1], str(n)])

    def background(self, name: str, p: Picker) -> str:
        return p.pick(f"background/{name}", self.backgrounds[name])


EN, FR = English(), French()
LANGUAGES = (EN, FR)

# Short caption templates: name -> (English, French). They name only what stands out: A and B, the
# largest and the second largest object (sized: with their size words), their relation (rAB is
# "relation of A to B" followed by B, rBA the inverse followed by A), the count n, the background bg.
SHORT_ONE = {
    "plain": ("{A_a}", "{A_a}"),
    "background": ("{A_a} on a {bg} background", "{A_a} sur un fond {bg}"),
    "lone": ("a lone {A_bare}", "un{A_e} seul{A_e} {A_bare}"),
    "image": ("an image of {A_a}", "une image avec {A_a}"),
    "only": ("there is only {A_a}", "il n'y a qu'{A_a}"),
}
SHORT_TWO = {
    "pair": ("{A_a} {rAB_a}", "{A_a} {rAB_a}"),
    "pair_inverse": ("{B_a} {rBA_a}", "{B_a} {rBA_a}"),
    "there_is": ("there is {A_a} {rAB_a}", "il y a {A_a} {rAB_a}"),
    "statement": ("{B_the} is {rBA_the}", "{B_the} est {rBA_the}"),
    "showing": ("an image showing {B_a} {rBA_a}", "une image montrant {B_a} {rBA_a}"),
    "sits": ("{A_a} sits {rAB_a}", "{A_a} se trouve {rAB_a}"),
    "sized": ("{A_sized} {rAB_sized}", "{A_sized} {rAB_sized}"),
    "largest": ("the largest shape is {A_a}, {rAB_a}", "la plus grande forme est {A_a}, {rAB_a}"),
    "count": ("{n} shapes, including {A_a} {rAB_a}", "{n} formes, dont {A_a} {rAB_a}"),
    "background": ("{A_a} {rAB_a} on a {bg} background", "{A_a} {rAB_a} sur un fond {bg}"),
    "and": ("{A_a} and {B_a}", "{A_a} et {B_a}"),  # true for both position twins: not used for them
    "among": ("{A_a} {rAB_a}, among other shapes", "{A_a} {rAB_a}, parmi d'autres formes"),  # 3+ objects
}
LONG_INTRO = [
    ("This image shows {n} shapes on a {bg} background.", "Cette image montre {n} formes sur un fond {bg}."),
    ("There are {n} shapes in this picture, on a {bg} background.", "Il y a {n} formes dans cette image, sur un fond {bg}."),
    ("A {bg} canvas holds {n} shapes.", "Un fond {bg} porte {n} formes."),
]
LONG_INTRO_ONE = [
    ("This image shows a single shape on a {bg} background.", "Cette image montre une seule forme sur un fond {bg}."),
    ("There is only one shape in this picture, on a {bg} background.", "Il n'y a qu'une forme dans cette image, sur un fond {bg}."),
]
LONG_OBJECT = [
    ("{X} is {pos}.", "{X} est {pos}."),
    ("{pos}, there is {X}.", "{pos}, il y a {X}."),
    ("{X} sits {pos}.", "{X} se trouve {pos}."),
    ("We can see {X} {pos}.", "On voit {X} {pos}."),
]
LONG_RELATION = [
    ("{X} is {rel}.", "{X} est {rel}."),
    ("{X} lies {rel}.", "{X} se situe {rel}."),
]


def short_template_names(scene: Scene) -> list[str]:
    if len(scene.objects) == 1:
        return list(SHORT_ONE)
    names = list(SHORT_TWO)
    if scene.twin_kind == "position":
        names.remove("and")
    if len(scene.objects) == 2:
        names.remove("among")
    return names


def _slots(lang: English | French, scene: Scene, p: Picker) -> dict[str, str]:
    a = scene.objects[0]
    slots = {"A_a": lang.a(a, p), "A_bare": lang.bare(a, p), "A_e": lang.fem(a, p),
             "bg": lang.background(scene.background, p), "n": lang.count(len(scene.objects), p)}
    if len(scene.objects) > 1:
        b, rel = scene.objects[1], scene.relation
        slots.update(
            B_a=lang.a(b, p),
            B_the=lang.the(b, p),
            rAB_a=lang.rel(rel, lang.a(b, p), p),
            rBA_a=lang.rel(INVERSE[rel], lang.a(a, p), p),
            rBA_the=lang.rel(INVERSE[rel], lang.the(a, p), p),
            A_sized=lang.a(a, p, sized=True),
            rAB_sized=lang.rel(rel, lang.a(b, p, sized=True), p),
        )
    return slots


def short_captions(scene: Scene, seed: str, n: int) -> tuple[list[str], list[str]]:
    """`n` paraphrases of what stands out (the two largest objects and their relation, sometimes
    their sizes, the count or the background), in English and (parallel) French."""
    names = Picker(seed).order("short", short_template_names(scene))[:n]
    templates = SHORT_ONE if len(scene.objects) == 1 else SHORT_TWO
    out: tuple[list[str], list[str]] = ([], [])
    for i, name in enumerate(names):
        p = Picker(f"{seed}/short/{i}")
        stop = "." if p.chance("stop", 0.5) else ""
        for lang, template, captions in zip(LANGUAGES, templates[name], out):
            captions.append(_cap(template.format(**_slots(lang, scene, p))) + stop)
    return out


def _long_order(scene: Scene, p: Picker) -> list[int]:
    """The two main objects first (in either order), then the others in a random order."""
    main = [int(i) for i in p.order("main", [str(i) for i in range(min(2, len(scene.objects)))])]
    return main + [int(i) for i in p.order("objects", [str(i) for i in range(2, len(scene.objects))])]


def long_caption(scene: Scene, seed: str) -> tuple[str, str]:
    """A dense description, in English and French: the count and the background, then every object
    (size, colour, shape, position), each after the first followed by its relation to the previous
    one. Like a dense captioner, it starts with the two main objects and their relation, so it says
    all that a short caption says; the other objects follow in a random order, so in a busy scene
    those past CLIP's 77 tokens are any of them."""
    p = Picker(f"{seed}/long")
    objects = scene.objects
    order = _long_order(scene, p)
    out = []
    for k, lang in enumerate(LANGUAGES):
        intro = p.pick("intro", LONG_INTRO_ONE if len(objects) == 1 else LONG_INTRO)[k]
        sentences = [intro.format(n=lang.count(len(objects), p), bg=lang.background(scene.background, p))]
        for j, i in enumerate(order):
            obj = objects[i]
            template = p.pick(f"object/{j}", LONG_OBJECT)[k]
            sentences.append(_cap(template.format(X=lang.a(obj, p, sized=True), pos=lang.position(obj, p))))
            if j == 0:
                continue
            x, y = objects[order[j - 1]], obj  # the relation to the previous object follows each object
            if p.chance(f"flip/{j - 1}", 0.5):
                x, y = y, x
            # The main pair's relation is on the axis that the short captions use.
            vertical = scene.relation in ("above", "below") if j == 1 else p.chance(f"axis/{j - 1}", 0.5)
            name = relation(x, y, vertical=vertical)
            template = p.pick(f"relation/{j - 1}", LONG_RELATION)[k]
            sentences.append(_cap(template.format(X=lang.the(x, p), rel=lang.rel(name, lang.the(y, p), p))))
        out.append(" ".join(sentences))
    return out[0], out[1]


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


QA_TYPES = ("color", "shape", "count", "position", "size", "yesno", "binding")
BIGGEST = ("biggest shape", "largest shape", "main shape")  # how a question names objects[0]


def questions(scene: Scene, rng: random.Random) -> list[dict]:
    """One question of each of QA_TYPES, with a short exact answer.

    As in VQAv2, most questions are about what stands out: the biggest shape's colour, shape and
    place, the background, how many shapes there are, which shape has a given size, whether a kind
    of shape is present. Answering them takes the image but no search for one object among many.
    "binding" is the hard category: it names an object by its colour or shape and asks about
    another of its attributes (or whether a colour-shape pair, maybe swapped, is present).
    """
    objects = scene.objects
    main = objects[0]
    qa = []
    if rng.random() < 0.25:
        qa.append({"question": "What color is the background?", "answer": scene.background, "type": "color"})
    else:
        qa.append({"question": f"What color is the {rng.choice(BIGGEST)}?", "answer": main.color, "type": "color"})
    qa.append({"question": f"What shape is the {rng.choice(BIGGEST).replace('shape', 'object')}?", "answer": main.shape, "type": "shape"})
    qa.append({"question": "How many shapes are there?", "answer": str(len(objects)), "type": "count"})
    qa.append({"question": f"Where is the {rng.choice(BIGGEST)}?", "answer": main.position, "type": "position"})
    o = rng.choice([objects[0], objects[1], rng.choice(objects[2:])])  # large, medium or small, evenly
    qa.append({"question": f"What size is the shape {EN.positions[o.position][0]}?", "answer": o.size, "type": "size"})
    present = {o.shape for o in objects}
    if rng.random() < 0.5 or present == set(SHAPES):
        shape, answer = rng.choice(sorted(present)), "yes"
    else:
        shape, answer = rng.choice(sorted(set(SHAPES) - present)), "no"
    qa.append({"question": f"Is there {_article(shape)}?", "answer": answer, "type": "yesno"})
    qa.append({**_binding_question(objects, rng), "type": "binding"})
    return qa


def _binding_question(objects: Sequence[Obj], rng: random.Random) -> dict:
    """A question that must find one object by its words: its colour, its place, or a yes/no on a
    colour-shape pair where the "no" pairs reuse the scene's own words, swapped."""
    shape_counts = Counter(o.shape for o in objects)
    unique = [o for o in objects if shape_counts[o.shape] == 1]
    kind = rng.randrange(3)
    if kind == 0 and unique:
        o = rng.choice(unique)
        return {"question": f"What color is the {o.shape}?", "answer": o.color}
    if kind <= 1:
        o = rng.choice(objects)
        return {"question": f"Where is the {o.color} {o.shape}?", "answer": o.position}
    present = {(o.color, o.shape) for o in objects}
    swapped = sorted({(x.color, y.shape) for x in objects for y in objects} - present)
    absent = swapped or sorted({(c, s) for c in COLORS for s in SHAPES} - present)
    if rng.random() < 0.5:
        (color, shape), answer = rng.choice(sorted(present)), "yes"
    else:
        (color, shape), answer = rng.choice(absent), "no"
    return {"question": f"Is there {_article(color)} {shape}?", "answer": answer}


def generic_sentences(rng: random.Random, n_relations: int) -> list[str]:
    """Sentences about the vocabulary itself (synonyms, shape facts, inverse relations), in
    English, French and as "English = French" parallel lines."""
    lines = []
    for color in COLORS:
        base_en, base_fr = EN.colors[color][0], FR.colors[color][0][0]
        for word in EN.colors[color][1:]:
            lines.append(f"{_cap(word)} is a shade of {base_en}.")
        for masc, _ in FR.colors[color][1:]:
            lines.append(f"{_cap(masc)} est une nuance de {base_fr}.")
        lines.append(f"{_cap(base_en)} = {_cap(base_fr)}")
    for shape in SHAPES:
        for en_word in EN.shapes[shape][1:]:
            lines.append(f"{_cap(_article(en_word))} is {_article(EN.shapes[shape][0])}.")
        base_fr, gender, _ = FR.shapes[shape][0]
        for noun, g, tail in FR.shapes[shape][1:]:
            lines.append(f"{'Une' if g == 'f' else 'Un'} {noun}{tail} est {'une' if gender == 'f' else 'un'} {base_fr}.")
    facts = [
        ("A triangle has three sides.", "Un triangle a trois côtés."),
        ("A square has four equal sides.", "Un carré a quatre côtés égaux."),
        ("A hexagon has six sides.", "Un hexagone a six côtés."),
        ("A star has five points.", "Une étoile a cinq branches."),
        ("A circle has no corners.", "Un cercle n'a pas de coins."),
        ("A cross has four arms.", "Une croix a quatre bras."),
        ("Big means large and tiny means small.", "Gros veut dire grand et minuscule veut dire petit."),
    ]
    for en, fr in facts:
        lines += [en, fr, f"{en} = {fr}"]
    for i in range(n_relations):
        a_obj, b_obj = (Obj(rng.choice(SHAPES), rng.choice(COLORS), "medium", 0) for _ in range(2))
        if (a_obj.shape, a_obj.color) == (b_obj.shape, b_obj.color):
            continue
        name = rng.choice(list(INVERSE))
        p = Picker(f"generic/{rng.random()}")
        en = (f"If {EN.the(a_obj, p)} is {EN.rel(name, EN.the(b_obj, p), p)}, "
              f"then {EN.the(b_obj, p)} is {EN.rel(INVERSE[name], EN.the(a_obj, p), p)}.")
        fr = (f"Si {FR.the(a_obj, p)} est {FR.rel(name, FR.the(b_obj, p), p)}, "
              f"alors {FR.the(b_obj, p)} est {FR.rel(INVERSE[name], FR.the(a_obj, p), p)}.")
        lines.append(rng.choice([en, fr, f"{en} = {fr}"]))
    return lines
