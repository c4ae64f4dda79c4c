import pytest

from MedicalSAM3Core.common.errors import InputError
from MedicalSAM3Core.common.prompts import PromptDictionary, default_dictionary, split_prompt_text

REQUIRED = ["Liver", "Spleen", "Right kidney", "Left kidney", "Gallbladder", "Stomach", "Aorta", "Pancreas",
            "Esophagus", "Duodenum", "Inferior vena cava", "Left adrenal gland", "Right adrenal gland",
            "Liver tumors", "Kidney lesions", "Myocardium", "Left Ventricle", "Polyp", "Skin Lesion",
            "thyroid nodule", "fetal head", "Nucleus", "Retinal Blood Vessel", "Optic Disc", "Lung",
            "Brain Tumor"]


def test_dictionary_holds_the_medical_sam3_vocabulary_with_color_and_snomed():
    dictionary = default_dictionary()
    assert set(REQUIRED) <= set(dictionary.names)
    for concept in dictionary.concepts:
        assert len(concept.color) == 3 and all(0 <= c <= 255 for c in concept.color)
        assert concept.type.scheme == "SCT" and concept.type.code.isdigit() or concept.type.scheme.startswith("99")
        assert concept.category.code.isdigit()  # codes checked in full by test_prompt_coverage.py


@pytest.mark.parametrize("typed, canonical", [
    ("IVC", "Inferior vena cava"), ("kidney left", "Left kidney"), ("L kidney", "Left kidney"),
    ("gall bladder", "Gallbladder"), ("LIVER", "Liver"), ("left_kidney", "Left kidney"), ("  spleen ", "Spleen"),
    ("Right-Kidney", "Right kidney"),
])
def test_synonyms_and_abbreviations_map_to_canonical_names(typed, canonical):
    resolved = default_dictionary().resolve(typed)
    assert resolved.known and resolved.model_text == canonical and resolved.warning is None


def test_unknown_text_goes_to_the_model_as_free_text_with_a_suggestion():
    resolved = default_dictionary().resolve("livr")
    assert not resolved.known
    assert resolved.model_text == "livr"
    assert "Liver" in resolved.suggestions
    assert "did you mean" in resolved.warning and "'Liver'" in resolved.warning


@pytest.mark.parametrize("bad", ["", "   ", "\n"])
def test_empty_prompt_is_refused(bad):
    with pytest.raises(InputError, match="empty prompt"):
        default_dictionary().resolve(bad)


def test_prompt_list_refuses_nothing_and_duplicates():
    with pytest.raises(InputError, match="no prompt"):
        default_dictionary().resolve_all([])
    with pytest.raises(InputError, match="same structure"):
        default_dictionary().resolve_all(["liver", "Liver"])


def test_split_prompt_text_accepts_commas_and_newlines():
    assert split_prompt_text("liver, spleen\nleft kidney;  ") == ["liver", "spleen", "left kidney"]


def test_conflicting_synonym_is_a_dictionary_error(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"categories": {"a": {"code": "1", "meaning": "A"}}, "concepts": ['
                    '{"name": "X", "synonyms": ["same"], "color": [1,2,3], "category": "a", "type": {"code": "1", "meaning": "X"}},'
                    '{"name": "Y", "synonyms": ["same"], "color": [1,2,3], "category": "a", "type": {"code": "2", "meaning": "Y"}}]}')
    with pytest.raises(ValueError, match="maps to both"):
        PromptDictionary.load(path)


@pytest.mark.parametrize("name, side", [("Left kidney", "Left"), ("Right kidney", "Right"),
                                        ("Left adrenal gland", "Left"), ("Right adrenal gland", "Right")])
def test_laterality_is_a_type_modifier_of_the_unlateralized_structure(name, side):
    concept = default_dictionary().lookup(name)
    structure = name.split(" ", 1)[1].capitalize()
    assert concept.type.meaning == structure and concept.type.code in {"64033007", "23451007"}
    assert concept.type.modifier.meaning == side
    assert concept.type.modifier.code == {"Left": "7771000", "Right": "24028007"}[side]
    assert concept.terminology()["type"]["modifier"] == {"scheme": "SCT", "code": concept.type.modifier.code,
                                                         "meaning": side}
    assert "modifier" not in default_dictionary().lookup("liver").terminology()["type"]


def test_terminology_string_names_the_shipped_contexts_in_slicers_seven_fields():
    from MedicalSAM3Core.common.terminology import CONTEXT_NAME, REGION_CONTEXT_NAME, terminology_string

    left = terminology_string(default_dictionary().lookup("left kidney").terminology()).split("~")
    assert left == [CONTEXT_NAME, "SCT^123037004^Anatomical Structure", "SCT^64033007^Kidney", "SCT^7771000^Left",
                    "", "^^", "^^"]
    tumor = terminology_string(default_dictionary().lookup("liver tumor").terminology()).split("~")
    assert tumor == [CONTEXT_NAME, "SCT^49755003^Morphologically Altered Structure", "SCT^108369006^Neoplasm", "^^",
                     REGION_CONTEXT_NAME, "SCT^10200004^Liver", "^^"]


def test_shipped_terminology_contexts_are_generated_from_this_dictionary():
    from MedicalSAM3Core.common.terminology import stale_files

    assert stale_files() == [], "run: python -m MedicalSAM3Core.common.terminology"
