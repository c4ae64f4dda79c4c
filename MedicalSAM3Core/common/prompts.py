"""The one prompt dictionary: user text -> canonical Medical SAM3 concept, color and terminology.

Read from ``Resources/prompts.json``; the engine, the CLI, the Slicer module (autocompletion,
terminology) and the training label-to-text mapping all use this module. Unknown text is still
sent to the model verbatim (SAM3 is open-vocabulary) with a warning and "did you mean" suggestions.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

from .errors import InputError
from .resources import resources_dir

#: Color for free-text prompts that are not in the dictionary, cycled by prompt position.
_FALLBACK_COLORS = [(128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210),
                    (216, 101, 79), (221, 130, 101), (144, 238, 144), (192, 104, 88)]


def normalize(text: str, spellings: Optional[dict[str, str]] = None) -> str:
    """Case-, punctuation- and whitespace-insensitive key: ``"Left_Kidney "`` -> ``"left kidney"``.

    ``spellings`` (the dictionary's British -> American word map) rewrites whole words, plurals
    included: ``"liver tumours"`` -> ``"liver tumors"``.
    """
    text = text.lower().replace("_", " ").replace("-", " ")
    text = re.sub(r"[^\w\s]", " ", text)
    words = text.split()
    if spellings:
        words = [spellings.get(w) or (spellings[w[:-1]] + "s" if w.endswith("s") and w[:-1] in spellings else w)
                 for w in words]
    return " ".join(words)


def _number_variants(key: str) -> list[str]:
    """The key with its last word in the other grammatical number (``adrenal glands`` ->
    ``adrenal gland``, ``lung lesion`` -> ``lung lesions``): tried only when the key itself is unknown."""
    head, _, last = key.rpartition(" ")
    prefix = f"{head} " if head else ""
    if last.endswith("ies"):
        forms = [last[:-3] + "y"]
    elif last.endswith("es"):
        forms = [last[:-2], last[:-1]]
    elif last.endswith("s"):
        forms = [last[:-1]]
    else:
        forms = [last + "s", last + "es", last[:-1] + "ies" if last.endswith("y") else ""]
    return [prefix + form for form in forms if len(form) > 2]


def split_prompt_text(text: str) -> list[str]:
    """Split what a user typed (``"liver, spleen\\nleft kidney"``) into individual prompts."""
    return [part.strip() for part in re.split(r"[,;\n]", text) if part.strip()]


@dataclass(frozen=True)
class Terminology:
    """A coded concept (SNOMED CT by default), as Slicer's terminology selector stores it.

    ``modifier`` qualifies a type or an anatomic region, as in Slicer's terminology contexts: a
    laterality (SCT 7771000 "Left", SCT 24028007 "Right") is a modifier of the unlateralized
    structure (Kidney + Left), not a separate type.
    """

    code: str
    meaning: str
    scheme: str = "SCT"
    modifier: Optional["Terminology"] = None

    def to_dict(self) -> dict:
        data = {"scheme": self.scheme, "code": self.code, "meaning": self.meaning}
        if self.modifier is not None:
            data["modifier"] = self.modifier.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Terminology":
        modifier = data.get("modifier")
        return cls(data["code"], data["meaning"], data.get("scheme", "SCT"),
                   cls.from_dict(modifier) if modifier else None)


@dataclass(frozen=True)
class Concept:
    """One canonical concept of the dictionary."""

    name: str
    synonyms: tuple[str, ...]
    color: tuple[int, int, int]
    category: Terminology
    type: Terminology
    region: Optional[Terminology] = None
    ct_window: str = "soft_tissue"
    #: names of the concepts a paired or grouped structure is made of ("Kidney": Left and Right
    #: kidney), sent in its place to a model that does not know the structure as a whole
    parts: tuple[str, ...] = ()
    #: TotalSegmentator class names this concept covers (``kidney_left``); they are synonyms too
    totalsegmentator: tuple[str, ...] = ()

    def terminology(self) -> dict:
        """``{"category", "type", "region"}`` as plain dicts (``type``/``region`` may hold a
        ``modifier``): what a result's ``LabelInfo.terminology`` carries and
        :func:`MedicalSAM3Core.common.terminology.terminology_string` reads."""
        return {"category": self.category.to_dict(), "type": self.type.to_dict(),
                "region": self.region.to_dict() if self.region else None}


@dataclass(frozen=True)
class ResolvedPrompt:
    """What one user prompt became (a paired or grouped structure becomes one per part).

    ``model_text`` is the text given to the model: for a known concept, the phrase of it the model
    was trained on (its ``trained_concepts``; without such a list, the concept's canonical name,
    Medical SAM3's phrase), the user's text (trimmed) otherwise. ``concept`` is ``None`` for free
    text. ``trained`` says whether the model lists ``model_text`` among what it was trained on
    (``None`` when it lists nothing, as SAM3's open-vocabulary weights). ``part_of`` names the group
    a part came from ("Kidney" for "Left kidney" from "kidneys").
    """

    user_text: str
    model_text: str
    concept: Optional[Concept]
    color: tuple[int, int, int]
    suggestions: tuple[str, ...] = field(default=())
    trained: Optional[bool] = None
    part_of: Optional[str] = None

    @property
    def name(self) -> str:
        return self.concept.name if self.concept else self.model_text

    @property
    def known(self) -> bool:
        return self.concept is not None

    @property
    def warning(self) -> Optional[str]:
        if self.concept is not None:
            return None
        hint = f"; did you mean {', '.join(repr(s) for s in self.suggestions)}?" if self.suggestions else ""
        return f"{self.user_text!r} is not in the prompt dictionary; sending it to the model as free text{hint}"


_SIDES = ("left", "right", "both")


class PromptDictionary:
    """Lookup from anything a user types to a :class:`Concept`.

    A prompt matches a concept's name, a synonym or a TotalSegmentator class name, compared as
    :func:`normalize` writes them (British spellings read as American ones); then, with a side word
    anywhere ("kidney left", "L kidney", "rt lower lobe": ``laterality``), the concept of that
    structure and side; then the same with the last word in the other number ("adrenal glands").
    """

    def __init__(self, concepts: list[Concept], laterality: Optional[dict[str, list[str]]] = None,
                 spellings: Optional[dict[str, str]] = None) -> None:
        self.concepts = concepts
        self.spellings = {k.lower(): v.lower() for k, v in (spellings or {}).items()}
        self._side_of = {word.lower(): side for side, words in (laterality or {}).items() for word in words}
        unknown_sides = set((laterality or {})) - set(_SIDES)
        if unknown_sides:
            raise ValueError(f"prompt dictionary: laterality has {sorted(unknown_sides)}; use {', '.join(_SIDES)}")
        self._by_name = {c.name: c for c in concepts}
        self._by_key: dict[str, Concept] = {}
        self._lateral: dict[tuple[str, str], Concept] = {}
        for concept in concepts:
            for text in self.texts(concept):
                key = self.key(text)
                other = self._by_key.get(key)
                if other is not None and other is not concept:
                    raise ValueError(f"prompt dictionary: {text!r} maps to both {other.name!r} and {concept.name!r}")
                self._by_key[key] = concept
        for concept in concepts:
            for text in self.texts(concept):
                split = self._split_side(self.key(text))
                if split is None:
                    continue
                other = self._lateral.get(split)
                if other is not None and other is not concept:
                    raise ValueError(f"prompt dictionary: {text!r} names the {split[1]} side of {split[0]!r} as "
                                     f"{other.name!r} already does ({concept.name!r})")
                self._lateral[split] = concept
            for part in concept.parts:
                if part not in self._by_name or self._by_name[part].parts:
                    raise ValueError(f"prompt dictionary: part {part!r} of {concept.name!r} is not a concept without parts")

    @staticmethod
    def texts(concept: Concept) -> tuple[str, ...]:
        """Every text that names ``concept``: its name, synonyms and TotalSegmentator class names."""
        return (concept.name, *concept.synonyms, *concept.totalsegmentator)

    def key(self, text: str) -> str:
        """``text`` as the dictionary compares it (:func:`normalize` with its spellings)."""
        return normalize(text, self.spellings)

    def _split_side(self, key: str) -> Optional[tuple[str, str]]:
        """``"kidney left"`` -> ``("kidney", "left")``: the structure without its one side word, or
        ``None`` when the key has no side word, two different ones, or nothing else."""
        words = key.split()
        sides = {self._side_of[w] for w in words if w in self._side_of}
        rest = [w for w in words if w not in self._side_of]
        if len(sides) != 1 or not rest:
            return None
        return " ".join(rest), sides.pop()

    @classmethod
    def load(cls, path: Optional[Path] = None) -> "PromptDictionary":
        path = Path(path) if path else resources_dir() / "prompts.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        categories = {key: Terminology.from_dict(v) for key, v in data["categories"].items()}
        concepts = []
        for entry in data["concepts"]:
            region = entry.get("region")
            concepts.append(Concept(
                name=entry["name"],
                synonyms=tuple(entry.get("synonyms", ())),
                color=tuple(int(c) for c in entry["color"]),  # type: ignore[arg-type]
                category=categories[entry["category"]],
                type=Terminology.from_dict(entry["type"]),
                region=Terminology.from_dict(region) if region else None,
                ct_window=entry.get("ct_window", "soft_tissue"),
                parts=tuple(entry.get("parts", ())),
                totalsegmentator=tuple(entry.get("totalsegmentator", ())),
            ))
        return cls(concepts, data.get("laterality"), data.get("spellings"))

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def concept(self, name: str) -> Concept:
        """The concept of canonical name ``name`` (KeyError if there is none)."""
        return self._by_name[name]

    def completions(self) -> list[str]:
        """Every name and synonym, for autocompletion."""
        return sorted({c.name for c in self.concepts} | {s for c in self.concepts for s in c.synonyms}, key=str.lower)

    def lookup(self, text: str) -> Optional[Concept]:
        key = self.key(text)
        for candidate in (key, *_number_variants(key)):
            concept = self._by_key.get(candidate)
            if concept is not None:
                return concept
            split = self._split_side(candidate)
            if split is not None:
                base, side = split
                for base_form in (base, *_number_variants(base)):
                    concept = self._lateral.get((base_form, side))
                    if concept is not None:
                        return concept
        return None

    def search(self, text: str) -> list[Concept]:
        """Concepts whose name, a synonym or a TotalSegmentator class name contains ``text``
        (compared as :meth:`key` writes them), then those spelt like it (:meth:`suggest`), in
        dictionary order within each kind."""
        key = self.key(text)
        if not key:
            return []
        found = [c for c in self.concepts if any(key in self.key(n) for n in self.texts(c))]
        similar = [self.lookup(name) for name in self.suggest(text)]
        return found + [c for c in similar if c is not None and c not in found]

    def suggest(self, text: str, n: int = 3) -> tuple[str, ...]:
        matches = difflib.get_close_matches(self.key(text), list(self._by_key), n=n * 3, cutoff=0.6)
        names: list[str] = []
        for key in matches:
            name = self._by_key[key].name
            if name not in names:
                names.append(name)
        return tuple(names[:n])

    def most_labels(self, texts: Sequence[str]) -> int:
        """The most labels ``texts`` can become: a paired or grouped structure counts its parts
        (what :meth:`resolve_all` gives a model that does not know it as a whole)."""
        total = 0
        for text in texts:
            concept = self.lookup(text) if isinstance(text, str) else None
            total += len(concept.parts) if concept is not None and concept.parts else 1
        return total

    def resolve(self, text: str, position: int = 0, vocabulary: Optional[Sequence[str]] = None) -> ResolvedPrompt:
        """One prompt as a concept (a group is not expanded here: :meth:`resolve_all` does) and the
        text to send for it, given the model's ``vocabulary`` (its ``trained_concepts``; ``None``
        when it lists none)."""
        return self._resolve(text, position, self._vocabulary(vocabulary))

    def _resolve(self, text: str, position: int, known: Optional[dict[str, str]]) -> ResolvedPrompt:
        if not isinstance(text, str) or not text.strip():
            raise InputError("empty prompt: give a structure name such as 'liver'")
        cleaned = " ".join(text.split())
        concept = self.lookup(cleaned)
        if concept is not None:
            return self._resolved(cleaned, concept, known)
        trained = None if known is None else self.key(cleaned) in known
        model_text = known[self.key(cleaned)] if trained else cleaned
        return ResolvedPrompt(cleaned, model_text, None, _FALLBACK_COLORS[position % len(_FALLBACK_COLORS)],
                              self.suggest(cleaned), trained)

    def _vocabulary(self, vocabulary: Optional[Sequence[str]]) -> Optional[dict[str, str]]:
        """Key -> the model's own spelling of each phrase it was trained on."""
        if vocabulary is None:
            return None
        return {self.key(phrase): phrase for phrase in vocabulary if isinstance(phrase, str) and phrase.strip()}

    def _phrase(self, user_text: Optional[str], concept: Concept, known: Optional[dict[str, str]]) -> Optional[str]:
        """The model's phrase for ``concept``: what the user typed if the model knows that very
        phrase, else the first of the concept's texts it knows; ``None`` if it knows none."""
        if known is None:
            return None
        texts = ((user_text,) if user_text is not None else ()) + self.texts(concept)
        for text in texts:
            key = self.key(text)
            if key in known and self.lookup(known[key]) is concept:
                return known[key]
        return None

    def _resolved(self, user_text: str, concept: Concept, known: Optional[dict[str, str]],
                  part_of: Optional[str] = None) -> ResolvedPrompt:
        phrase = self._phrase(user_text if part_of is None else None, concept, known)
        trained = None if known is None else phrase is not None
        return ResolvedPrompt(user_text, phrase or concept.name, concept, concept.color, (), trained, part_of)

    def resolve_all(self, texts: list[str], vocabulary: Optional[Sequence[str]] = None) -> list[ResolvedPrompt]:
        """Resolve a prompt list for a model trained on ``vocabulary`` (its ``trained_concepts``;
        ``None``: it lists none, e.g. SAM3 or Medical SAM3 weights).

        A paired or grouped structure ("kidneys") is sent as one prompt when the model knows it as
        a whole (the demo model's "Lung"), else as one prompt per part ("Left kidney", "Right
        kidney": Medical SAM3's phrases), each its own label and segment: never one side in
        silence. Refuses an empty list and two prompts naming the same structure.
        """
        if not texts:
            raise InputError("no prompt given: name at least one structure, e.g. --prompt liver")
        known = self._vocabulary(vocabulary)
        resolved: list[ResolvedPrompt] = []
        for position, text in enumerate(texts):
            prompt = self._resolve(text, position, known)
            concept = prompt.concept
            if concept is not None and concept.parts and not prompt.trained:
                resolved += [self._resolved(prompt.user_text, self._by_name[part], known, concept.name)
                             for part in concept.parts]
            else:
                resolved.append(prompt)
        seen: dict[str, str] = {}
        for prompt in resolved:
            key = prompt.concept.name if prompt.concept is not None else self.key(prompt.model_text)
            if key in seen:
                raise InputError(f"prompts {seen[key]!r} and {prompt.user_text!r} name the same structure "
                                 f"({prompt.name}); give each structure once")
            seen[key] = prompt.user_text
        return resolved


@lru_cache(maxsize=1)
def default_dictionary() -> PromptDictionary:
    return PromptDictionary.load()
