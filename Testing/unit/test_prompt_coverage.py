"""The prompt dictionary covers what the models learnt and what radiologists type (issue #31).

Reference lists, committed with their sources (``Resources/prompt_sources/README.md``): Medical
SAM3's training vocabulary, and TotalSegmentator 2.18.0's class names with its SNOMED CT mapping.
"""

import json

import pytest

from MedicalSAM3Core.common.prompts import PromptDictionary, default_dictionary
from MedicalSAM3Core.common.resources import resources_dir

SOURCES = resources_dir() / "prompt_sources"
VOCABULARY = json.loads((SOURCES / "medical_sam3_vocabulary.json").read_text(encoding="utf-8"))["phrases"]
TOTALSEG = json.loads((SOURCES / "totalsegmentator-2.18.0.json").read_text(encoding="utf-8"))
TOTALSEG_CLASSES = sorted(set(TOTALSEG["tasks"]["total"]) | set(TOTALSEG["tasks"]["total_mr"]) | set(TOTALSEG["snomed"]))

LEFT, RIGHT, BOTH = "7771000", "24028007", "51440002"
#: Where the dictionary departs from TotalSegmentator's mapping, and why (README, "The prompt dictionary").
#: A combined class of a paired structure ("kidney") is the structure with the modifier "Right and
#: left", as in Slicer's DICOM master list; TotalSegmentator leaves it unmodified.
COMBINED = {"adrenal_gland", "autochthon", "clavicula", "femur", "gluteus_maximus", "gluteus_medius", "gluteus_minimus",
            "hip", "humerus", "iliac_artery", "iliac_vena", "iliopsoas", "kidney", "scapula"}
#: TotalSegmentator codes gluteus_minimus as Gluteus medius (78333006); its sides as Gluteus minimus
#: (75297007, "Gluteus minius muscle"). Phalanges of foot and hand share one type; a region tells them apart.
OTHER_DEPARTURES = {("gluteus_minimus", "type"): ("78333006", "75297007"),
                    ("phalanges_feet", "region"): (None, "56459004"), ("phalanges_hand", "region"): (None, "85562004")}


def _verhoeff_valid(number: str) -> bool:
    """SNOMED CT identifiers end in a Verhoeff check digit."""
    d = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
         [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
         [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
         [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
    p = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
         [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
         [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8]]
    check = 0
    for i, digit in enumerate(reversed(number)):
        check = d[check][p[i % 8][int(digit)]]
    return check == 0


def _codes(concept):
    """Every coded item of a concept: (what, scheme, code, meaning)."""
    items = [("category", concept.category), ("type", concept.type)]
    if concept.type.modifier:
        items.append(("type modifier", concept.type.modifier))
    if concept.region:
        items.append(("region", concept.region))
        if concept.region.modifier:
            items.append(("region modifier", concept.region.modifier))
    return [(what, t.scheme, t.code, t.meaning) for what, t in items]


def test_the_reference_lists_are_what_their_sources_say():
    assert len(VOCABULARY) == len(set(VOCABULARY)) == 82
    assert len(TOTALSEG["tasks"]["total"]) == 117 and len(TOTALSEG["tasks"]["total_mr"]) == 50
    assert len(TOTALSEG["snomed"]) == 170


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resources_dir() / "demo_model")  # SAM3's CLIP tokenizer


@pytest.mark.parametrize("phrase", VOCABULARY)
def test_every_medical_sam3_phrase_is_a_concept_and_is_sent_as_learnt(phrase, tokenizer):
    dictionary = default_dictionary()
    concept = dictionary.lookup(phrase)
    assert concept is not None, phrase
    # a model that lists its phrases (Medical SAM3's) gets this very phrase
    resolved = dictionary.resolve(phrase, 0, VOCABULARY)
    assert resolved.trained is True
    # the same tokens: SAM3's CLIP tokenizer lower-cases ("Left Atrium" and "Left atrium" are one phrase)
    assert resolved.model_text.lower() == phrase.lower()
    assert tokenizer(resolved.model_text)["input_ids"] == tokenizer(phrase)["input_ids"]
    # a model that lists nothing (converted Medical SAM3 weights) is sent phrases Medical SAM3 learnt
    learnt = {dictionary.key(p) for p in VOCABULARY}
    assert all(dictionary.key(p.model_text) in learnt for p in dictionary.resolve_all([phrase]))


@pytest.mark.parametrize("name", TOTALSEG_CLASSES)
def test_every_totalsegmentator_class_is_a_concept_with_its_published_codes(name):
    dictionary = default_dictionary()
    concept = dictionary.lookup(name)
    assert concept is not None and name in concept.totalsegmentator, name
    assert [c.name for c in dictionary.concepts if name in c.totalsegmentator] == [concept.name]
    published = TOTALSEG["snomed"].get(name)
    if published is None:  # lung_left, lung_right, vertebrae, intervertebral_discs: not in the mapping
        return
    ours = {"category": concept.category.code, "type": concept.type.code,
            "type_modifier": concept.type.modifier.code if concept.type.modifier else None,
            "region": concept.region.code if concept.region else None,
            "region_modifier": concept.region.modifier.code if concept.region and concept.region.modifier else None}
    for field, code in ours.items():
        theirs = (published.get(field) or {}).get("code")
        if (name, field) in OTHER_DEPARTURES:
            assert (theirs, code) == OTHER_DEPARTURES[(name, field)]
        elif name in COMBINED and field == "type_modifier":
            assert theirs is None and code == BOTH
            assert [dictionary.concept(part).type.modifier.code for part in concept.parts] == [LEFT, RIGHT]
        else:
            assert code == theirs, (name, field)


def test_every_text_names_one_concept_and_every_code_is_well_formed():
    dictionary = default_dictionary()
    meanings: dict[tuple, str] = {}
    categories = {"123037004", "49755003", "85756007", "260787004"}  # Slicer's: anatomy, altered, tissue, object
    seen_terms: dict[tuple, str] = {}
    for concept in dictionary.concepts:
        for text in dictionary.texts(concept):
            assert dictionary.lookup(text) is concept, (text, concept.name)
        for what, scheme, code, meaning in _codes(concept):
            if scheme == "SCT":
                assert code.isdigit() and 6 <= len(code) <= 18 and not code.startswith("0"), (concept.name, what, code)
                assert _verhoeff_valid(code), (concept.name, what, code)
                assert code[-3:-1] in ("00", "10"), (concept.name, what, code)  # a concept identifier
            else:  # DICOM private coding scheme: designator beginning "99"
                assert scheme.startswith("99") and code, (concept.name, what, scheme, code)
            assert meanings.setdefault((scheme, code), meaning) == meaning, (concept.name, code)
        assert concept.category.code in categories
        modifier = concept.type.modifier
        if modifier is not None and modifier.code in (LEFT, RIGHT, BOTH):
            assert concept.category.code == "123037004"  # laterality qualifies anatomy
        # a segment's terminology names one concept
        terms = tuple(item[1:3] for item in _codes(concept))
        assert seen_terms.setdefault(terms, concept.name) == concept.name, \
            f"{concept.name!r} and {seen_terms[terms]!r} have the same codes"
        # a group is its parts' structure, both sides
        if concept.parts:
            codes = {tuple(item[1:3] for item in _codes(dictionary.concept(part)) if item[0] != "type modifier"
                           and item[0] != "region modifier") for part in concept.parts}
            assert codes == {tuple(item[1:3] for item in _codes(concept) if "modifier" not in item[0])}, concept.name
            assert (concept.type.modifier or concept.region.modifier).code == BOTH, concept.name


def test_laterality_in_any_position_and_paired_structures():
    dictionary = default_dictionary()
    for typed in ("left kidney", "L kidney", "kidney left", "Kidney (left)", "lt kidney", "kidney_left"):
        assert dictionary.lookup(typed).name == "Left kidney", typed
    for typed in ("right lower lobe", "RLL", "lower lobe right", "rt lower lobe", "lung_lower_lobe_right"):
        assert dictionary.lookup(typed).name == "Lung lower lobe right", typed
    assert dictionary.lookup("femur R").name == "Right femur"
    assert dictionary.lookup("rib 3 left").name == "Left rib 3"
    assert [p.name for p in dictionary.resolve_all(["kidneys"])] == ["Left kidney", "Right kidney"]
    assert [p.name for p in dictionary.resolve_all(["adrenal glands"])] == ["Left adrenal gland", "Right adrenal gland"]
    assert [p.name for p in dictionary.resolve_all(["lungs"])] == ["Left lung", "Right lung"]
    assert [p.part_of for p in dictionary.resolve_all(["bilateral kidneys"])] == ["Kidney", "Kidney"]
    # Medical SAM3 knows ribs and vertebrae as one phrase each: one prompt
    assert [p.model_text for p in dictionary.resolve_all(["ribs", "vertebra"])] == ["Ribs", "Vertebrae"]
    # a model that knows the lungs as one concept (the demo model's "Lung") gets one prompt
    assert [(p.name, p.model_text) for p in dictionary.resolve_all(["lungs"], ["Lung"])] == [("Lung", "Lung")]
    with pytest.raises(Exception, match="same structure"):
        dictionary.resolve_all(["kidneys", "left kidney"])


@pytest.mark.parametrize("typed, canonical", [
    ("liver tumour", "Liver tumors"), ("oesophagus", "Esophagus"), ("haemorrhage", "Hemorrhage"),
    ("intracranial haemorrhage", "Intracerebral hemorrhage"), ("brain bleed", "Intracerebral hemorrhage"),
    ("tumours", "Lesion"), ("metastasis", "Lesion"), ("pulmonary nodules", "Lung lesions"), ("renal cysts", "Kidney cyst"),
    ("SVC", "Superior vena cava"), ("LV", "Left Ventricle"), ("RV", "Right ventricle cavity"), ("LA", "Left atrium"),
    ("RA", "Right atrium"), ("CBD", "Common bile duct"), ("SMA", "Superior mesenteric artery"), ("heart", "Heart"),
    ("kidney", "Kidney"), ("small intestine", "Small bowel"), ("L1", "L1 vertebra"), ("adrenal gland left", "Left adrenal gland"),
])
def test_spellings_plurals_abbreviations_and_findings(typed, canonical):
    assert default_dictionary().lookup(typed).name == canonical


def test_a_model_gets_the_phrase_it_learnt(tmp_path):
    dictionary = default_dictionary()
    demo = json.loads((resources_dir() / "demo_model" / "medsam3_preprocessing.json").read_text())["trained_concepts"]
    [vertebra] = dictionary.resolve_all(["vertebrae"], demo)
    assert (vertebra.name, vertebra.model_text, vertebra.trained) == ("Vertebrae", "Vertebra", True)
    [heart] = dictionary.resolve_all(["heart"], demo)
    assert heart.trained is False and heart.model_text == "Heart"
    [free] = dictionary.resolve_all(["my structure"], ["My Structure"])
    assert free.concept is None and free.model_text == "My Structure" and free.trained is True


def test_a_side_claimed_by_two_concepts_is_a_dictionary_error(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({
        "laterality": {"left": ["left", "l"]},
        "categories": {"a": {"code": "123037004", "meaning": "Anatomical Structure"}},
        "concepts": [{"name": "Left kidney", "color": [1, 2, 3], "category": "a", "type": {"code": "1", "meaning": "X"}},
                     {"name": "Kidney left side", "synonyms": ["l kidney"], "color": [1, 2, 3], "category": "a",
                      "type": {"code": "2", "meaning": "Y"}}]}))
    with pytest.raises(ValueError, match="left side of 'kidney'"):
        PromptDictionary.load(path)


def test_a_paired_structure_counts_as_its_parts_where_labels_are_sized():
    """The client sizes the largest result it accepts, and the CLI the disk space it needs, by the
    labels the prompts can become: "kidneys" is two."""
    from MedicalSAM3Core.common.client import result_bytes_for

    dictionary = default_dictionary()
    prompts = ["kidneys", "liver", "my structure"]
    assert dictionary.most_labels(prompts) == 3 + 1 == len(dictionary.resolve_all(prompts))
    shape = (300, 512, 512)
    assert result_bytes_for(shape, dictionary.most_labels(prompts)) - result_bytes_for(shape, len(prompts)) \
        == 300 * 512 * 512 // 8 + 1
