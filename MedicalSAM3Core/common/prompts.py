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
from typing import Optional

from .errors import InputError
from .resources import resources_dir

#: Color for free-text prompts that are not in the dictionary, cycled by prompt position.
_FALLBACK_COLORS = [(128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210),
                    (216, 101, 79), (221, 130, 101), (144, 238, 144), (192, 104, 88)]


def normalize(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive key: ``"Left_Kidney "`` -> ``"left kidney"``."""
    text = text.lower().replace("_", " ").replace("-", " ")
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


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

    def terminology(self) -> dict:
        """``{"category", "type", "region"}`` as plain dicts (``type``/``region`` may hold a
        ``modifier``): what a result's ``LabelInfo.terminology`` carries and
        :func:`MedicalSAM3Core.common.terminology.terminology_string` reads."""
        return {"category": self.category.to_dict(), "type": self.type.to_dict(),
                "region": self.region.to_dict() if self.region else None}


@dataclass(frozen=True)
class ResolvedPrompt:
    """What one user prompt became.

    ``model_text`` is the text given to the model: the canonical name for a known concept, the
    user's text (trimmed) otherwise. ``concept`` is ``None`` for free text.
    """

    user_text: str
    model_text: str
    concept: Optional[Concept]
    color: tuple[int, int, int]
    suggestions: tuple[str, ...] = field(default=())

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


class PromptDictionary:
    """Lookup from anything a user types to a :class:`Concept`."""

    def __init__(self, concepts: list[Concept]) -> None:
        self.concepts = concepts
        self._by_key: dict[str, Concept] = {}
        for concept in concepts:
            for text in (concept.name, *concept.synonyms):
                key = normalize(text)
                other = self._by_key.get(key)
                if other is not None and other is not concept:
                    raise ValueError(f"prompt dictionary: {text!r} maps to both {other.name!r} and {concept.name!r}")
                self._by_key[key] = concept

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
            ))
        return cls(concepts)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def completions(self) -> list[str]:
        """Every name and synonym, for autocompletion."""
        return sorted({c.name for c in self.concepts} | {s for c in self.concepts for s in c.synonyms}, key=str.lower)

    def lookup(self, text: str) -> Optional[Concept]:
        return self._by_key.get(normalize(text))

    def search(self, text: str) -> list[Concept]:
        """Concepts whose name or a synonym contains ``text`` (compared as :func:`normalize` writes
        them), then those spelt like it (:meth:`suggest`), in dictionary order within each kind."""
        key = normalize(text)
        if not key:
            return []
        found = [c for c in self.concepts if any(key in normalize(n) for n in (c.name, *c.synonyms))]
        similar = [self.lookup(name) for name in self.suggest(text)]
        return found + [c for c in similar if c is not None and c not in found]

    def suggest(self, text: str, n: int = 3) -> tuple[str, ...]:
        matches = difflib.get_close_matches(normalize(text), list(self._by_key), n=n * 3, cutoff=0.6)
        names: list[str] = []
        for key in matches:
            name = self._by_key[key].name
            if name not in names:
                names.append(name)
        return tuple(names[:n])

    def resolve(self, text: str, position: int = 0) -> ResolvedPrompt:
        if not isinstance(text, str) or not text.strip():
            raise InputError("empty prompt: give a structure name such as 'liver'")
        cleaned = " ".join(text.split())
        concept = self.lookup(cleaned)
        if concept is not None:
            return ResolvedPrompt(cleaned, concept.name, concept, concept.color)
        return ResolvedPrompt(cleaned, cleaned, None, _FALLBACK_COLORS[position % len(_FALLBACK_COLORS)],
                              self.suggest(cleaned))

    def resolve_all(self, texts: list[str]) -> list[ResolvedPrompt]:
        """Resolve a prompt list; refuses an empty list and two prompts naming the same concept."""
        if not texts:
            raise InputError("no prompt given: name at least one structure, e.g. --prompt liver")
        resolved = [self.resolve(t, i) for i, t in enumerate(texts)]
        seen: dict[str, str] = {}
        for prompt in resolved:
            key = normalize(prompt.model_text)
            if key in seen:
                raise InputError(f"prompts {seen[key]!r} and {prompt.user_text!r} name the same structure "
                                 f"({prompt.name}); give each structure once")
            seen[key] = prompt.user_text
        return resolved


@lru_cache(maxsize=1)
def default_dictionary() -> PromptDictionary:
    return PromptDictionary.load()
