"""ul3d.bundle.metadata: the bundle metadata.json schema and its Python-side checks."""

import copy
import json

import jsonschema
import pytest

from ul3d.bundle.metadata import (
    SCHEMA_PATH,
    MetadataError,
    load_schema,
    metadata_errors,
    validate_metadata,
)

MONAI_TOP_LEVEL = [
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
]
UL3D_TOP_LEVEL = ["changelog", "required_packages_version"]
TENSOR_KEYS = [
    "type",
    "format",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
]
INPUT = "network_data_format.inputs.image"
OUTPUT = "network_data_format.outputs.pred"


def valid_meta():
    """A ul3d-style 3D segmentation bundle: 2-channel MR (T2, ADC) in, 3 one-hot class channels out."""
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
        "version": "0.2.0",
        "changelog": {"0.2.0": "retrained with deep supervision", "0.1.0": "first release"},
        "monai_version": "1.6.1",
        "pytorch_version": "2.5.1+cpu",
        "numpy_version": "1.26.4",
        "optional_packages_version": {"nibabel": "5.2.1", "tensorboard": "2.17.0"},
        "required_packages_version": {"ul3d": "0.3.0", "einops": "0.8.0"},
        "task": "Prostate zonal segmentation",
        "description": "UltraLightUNet3D segmenting the peripheral and transition zones from T2 and ADC MR",
        "authors": "ul3d developers",
        "copyright": "Copyright (c) ul3d developers",
        "license": "Apache-2.0",
        "intended_use": "Research only, not for diagnostic purposes",
        "data_source": "Medical Segmentation Decathlon Task05_Prostate",
        "data_type": "nifti",
        "image_classes": "two channels: T2, ADC",
        "label_classes": "single channel: 0 background, 1 PZ, 2 TZ",
        "pred_classes": "3 channels OneHot: background, PZ, TZ",
        "eval_metrics": {"mean_dice": 0.71, "epochs": 300},
        "references": ["Rahman et al., UltraLightUNet, 2025"],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "MR",
                    "num_channels": 2,
                    "spatial_shape": [96, 96, 96],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {"0": "T2", "1": "ADC"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "labels",
                    "num_channels": 3,
                    "spatial_shape": [96, 96, 96],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "background", "1": "PZ", "2": "TZ"},
                }
            },
        },
    }


def spec_spleen_example():
    """The example metadata.json of the MONAI Bundle specification, channel_def keys written as JSON strings."""
    return {
        "version": "0.1.0",
        "changelog": {"0.1.0": "complete the model package", "0.0.1": "initialize the model package structure"},
        "monai_version": "0.8.0",
        "pytorch_version": "1.10.0",
        "numpy_version": "1.21.2",
        "optional_packages_version": {"nibabel": "3.2.1"},
        "task": "Decathlon spleen segmentation",
        "description": "A pre-trained model for volumetric (3D) segmentation of the spleen from CT image",
        "authors": "MONAI team",
        "copyright": "Copyright (c) MONAI Consortium",
        "data_source": "Task09_Spleen.tar from http://medicaldecathlon.com/",
        "data_type": "dicom",
        "image_classes": "single channel data, intensity scaled to [0, 1]",
        "label_classes": "single channel data, 1 is spleen, 0 is everything else",
        "pred_classes": "2 channels OneHot data, channel 1 is spleen, channel 0 is background",
        "eval_metrics": {"mean_dice": 0.96},
        "intended_use": "This is an example, not to be used for diagnostic purposes",
        "references": [
            (
                "Xia, Yingda, et al. '3D Semi-Supervised Learning with Uncertainty-Aware Multi-View Co-Training.' "
                "arXiv preprint arXiv:1811.12506 (2018). https://arxiv.org/abs/1811.12506."
            ),
            (
                "Kerfoot E., Clough J., Oksuz I., Lee J., King A.P., Schnabel J.A. (2019) Left-Ventricle Quantification "
                "Using Residual U-Net. STACOM 2018. LNCS vol 11395. https://doi.org/10.1007/978-3-030-12029-0_40"
            ),
        ],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "MR",
                    "num_channels": 1,
                    "spatial_shape": [160, 160, 160],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "labels",
                    "num_channels": 2,
                    "spatial_shape": [160, 160, 160],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": {"0": "background", "1": "spleen"},
                }
            },
        },
    }


def _parent(meta, dotted):
    *parents, last = dotted.split(".")
    node = meta
    for key in parents:
        node = node[key]
    return node, last


def with_value(dotted, value, meta=None):
    meta = copy.deepcopy(meta or valid_meta())
    node, last = _parent(meta, dotted)
    node[last] = value
    return meta


def without(dotted, meta=None):
    meta = copy.deepcopy(meta or valid_meta())
    node, last = _parent(meta, dotted)
    del node[last]
    return meta


def problems_of(meta, **kwargs):
    with pytest.raises(MetadataError) as info:
        validate_metadata(meta, **kwargs)
    assert info.value.problems == metadata_errors(meta, **kwargs)
    return info.value.problems


# --- the schema file itself --------------------------------------------------------------------------------


def test_schema_file_is_a_valid_2020_12_schema_next_to_the_module():
    assert SCHEMA_PATH.is_file() and SCHEMA_PATH.parent.name == "schema"
    assert SCHEMA_PATH.parent.parent.joinpath("metadata.py").is_file()
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_required_lists_are_the_ones_tested_here():
    """The parametrized tests below cover exactly the schema's mandatory keys: a key added to or dropped from
    the schema without a test fails here."""
    defs = load_schema()["$defs"]
    assert defs["monai_metadata"]["required"] == MONAI_TOP_LEVEL
    assert defs["ul3d_requirements"]["required"] == UL3D_TOP_LEVEL
    assert defs["tensor"]["required"] == TENSOR_KEYS
    assert defs["input_tensor"]["required"] == ["modality"]
    assert defs["network_data_format"]["required"] == ["inputs", "outputs"]


# --- valid metadata ----------------------------------------------------------------------------------------


def test_valid_example_passes_as_dict_and_as_file(tmp_path):
    meta = valid_meta()
    assert metadata_errors(meta) == []
    assert validate_metadata(meta) is meta
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(meta, indent=4), encoding="utf-8")
    assert validate_metadata(path) == meta
    assert validate_metadata(str(path), name="prostate") == meta


def test_monai_spec_spleen_example_passes_the_monai_rules():
    assert metadata_errors(spec_spleen_example(), profile="monai") == []
    assert validate_metadata(spec_spleen_example(), profile="monai") == spec_spleen_example()


def test_monai_spec_spleen_example_lacks_only_what_ul3d_adds():
    assert metadata_errors(spec_spleen_example()) == ["<top level>: missing required key 'required_packages_version'"]


@pytest.mark.parametrize(
    "dotted, value",
    [
        ("version", "1.0.0-rc.1+build.7"),
        ("spatial_shape_any", None),
        ("value_range_negative", None),
        (f"{OUTPUT}.modality", "MR"),  # optional on outputs, allowed
        ("custom_key", {"anything": [1, 2]}),  # extra top-level keys are allowed
        (f"{INPUT}.custom_tensor_key", 1),
        ("network_data_format.preprocessed_data_sources", {"image": "x"}),
        ("eval_metrics", {}),
        ("optional_packages_version", {}),
    ],
)
def test_accepted_variations(dotted, value):
    meta = valid_meta()
    if dotted == "version":
        meta["version"] = value
        meta["changelog"][value] = "release candidate"
    elif dotted == "spatial_shape_any":
        for where in (INPUT, OUTPUT):
            meta = with_value(f"{where}.spatial_shape", ["*", "16*n", "2**n*m"], meta)
    elif dotted == "value_range_negative":
        meta = with_value(f"{INPUT}.value_range", [-1024.0, 3071], meta)
    else:
        meta = with_value(dotted, value, meta)
    assert metadata_errors(meta) == []


# --- mandatory keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", MONAI_TOP_LEVEL + UL3D_TOP_LEVEL)
def test_missing_top_level_key_fails_naming_it(key):
    problems = problems_of(without(key))
    assert problems == [f"<top level>: missing required key '{key}'"]


@pytest.mark.parametrize("key", UL3D_TOP_LEVEL)
def test_ul3d_keys_are_optional_for_plain_monai(key):
    assert metadata_errors(without(key), profile="monai") == []


@pytest.mark.parametrize("key", ["inputs", "outputs"])
def test_missing_network_data_format_group_fails_naming_it(key):
    problems = problems_of(without(f"network_data_format.{key}"))
    assert problems == [f"network_data_format: missing required key '{key}'"]


@pytest.mark.parametrize("where", [INPUT, OUTPUT])
@pytest.mark.parametrize("key", TENSOR_KEYS)
def test_missing_tensor_key_fails_naming_it(where, key):
    problems = problems_of(without(f"{where}.{key}"))
    assert problems == [f"{where}: missing required key '{key}'"]


def test_inputs_need_a_modality_outputs_do_not():
    assert problems_of(without(f"{INPUT}.modality")) == [f"{INPUT}: missing required key 'modality'"]
    assert metadata_errors(without(f"{OUTPUT}.modality", with_value(f"{OUTPUT}.modality", "MR"))) == []


# --- wrong types and values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dotted, value, expected",
    [
        (f"{INPUT}.num_channels", "two", f"{INPUT}.num_channels: 'two' is not of type 'integer'"),
        (f"{INPUT}.num_channels", True, f"{INPUT}.num_channels: True is not of type 'integer'"),
        (f"{INPUT}.num_channels", 0, f"{INPUT}.num_channels: 0 is less than the minimum of 1"),
        (f"{INPUT}.type", 3, f"{INPUT}.type: 3 is not of type 'string'"),
        (f"{INPUT}.format", "", f"{INPUT}.format: must not be empty"),
        (f"{INPUT}.modality", None, f"{INPUT}.modality: None is not of type 'string'"),
        (f"{INPUT}.dtype", ["float32"], f"{INPUT}.dtype: ['float32'] is not of type 'string'"),
        (f"{INPUT}.is_patch_data", "false", f"{INPUT}.is_patch_data: 'false' is not of type 'boolean'"),
        (f"{INPUT}.is_patch_data", 0, f"{INPUT}.is_patch_data: 0 is not of type 'boolean'"),
        (f"{INPUT}.spatial_shape", "96,96,96", f"{INPUT}.spatial_shape: '96,96,96' is not of type 'array'"),
        (f"{INPUT}.spatial_shape", [96, 0, 96], f"{INPUT}.spatial_shape[1]: 0 is not valid: expected a positive"),
        (f"{INPUT}.spatial_shape", [96, 96.5, 96], f"{INPUT}.spatial_shape[1]: 96.5 is not valid"),
        (f"{INPUT}.spatial_shape", [96, "any", 96], None),  # 'any' is an expression (a product of variables)
        (f"{INPUT}.spatial_shape", [96, "n; rm", 96], f"{INPUT}.spatial_shape[1]: 'n; rm' is not valid"),
        (f"{INPUT}.value_range", [0], f"{INPUT}.value_range: [0] is not valid: expected [MIN, MAX]"),
        (f"{INPUT}.value_range", [0, 1, 2], f"{INPUT}.value_range: [0, 1, 2] is not valid"),
        (f"{INPUT}.value_range", ["0", "1"], f"{INPUT}.value_range[0]: '0' is not of type 'number'"),
        (f"{INPUT}.value_range", [1, 0], f"{INPUT}.value_range: minimum 1 exceeds maximum 0"),
        (f"{INPUT}.channel_def", ["T2", "ADC"], f"{INPUT}.channel_def: ['T2', 'ADC'] is not of type 'object'"),
        (f"{INPUT}.channel_def", {"0": "T2", "one": "ADC"}, f"{INPUT}.channel_def: key 'one' is not valid"),
        (f"{INPUT}.channel_def", {"0": "T2", "-1": "ADC"}, f"{INPUT}.channel_def: key '-1' is not valid"),
        (f"{INPUT}.channel_def", {"0": "T2", "01": "ADC"}, f"{INPUT}.channel_def: key '01' is not valid"),
        (f"{INPUT}.channel_def", {"0": "T2", "1": 2}, f"{INPUT}.channel_def.1: 2 is not of type 'string'"),
        ("network_data_format", [], "network_data_format: [] is not of type 'object'"),
        ("network_data_format.inputs", [], "network_data_format.inputs: [] is not of type 'object'"),
        ("network_data_format.outputs", {}, "network_data_format.outputs: {} should be non-empty"),
        ("network_data_format.inputs.image", "T2", f"{INPUT}: 'T2' is not of type 'object'"),
        ("version", "0.2", "version: '0.2' is not valid: expected a semantic version"),
        ("version", 2, "version: 2 is not of type 'string'"),
        ("monai_version", 1.6, "monai_version: 1.6 is not of type 'string'"),
        ("pytorch_version", "latest", "pytorch_version: 'latest' is not valid: expected a package version"),
        ("numpy_version", "", "numpy_version: '' is not valid"),
        ("optional_packages_version", ["nibabel"], "optional_packages_version: ['nibabel'] is not of type 'object'"),
        ("optional_packages_version", {"nibabel": 5}, "optional_packages_version.nibabel: 5 is not of type 'string'"),
        ("required_packages_version", {"ul3d": None}, "required_packages_version.ul3d: None is not of type"),
        ("task", "", "task: must not be empty"),
        ("description", None, "description: None is not of type 'string'"),
        ("authors", ["ul3d developers"], "authors: ['ul3d developers'] is not of type 'string'"),
        ("copyright", 2025, "copyright: 2025 is not of type 'string'"),
        ("references", "Rahman et al.", "references: 'Rahman et al.' is not of type 'array'"),
        ("references", ["a", 1], "references[1]: 1 is not of type 'string'"),
        ("eval_metrics", {"mean_dice": "0.71"}, "eval_metrics.mean_dice: '0.71' is not of type 'number'"),
        ("intended_use", 1, "intended_use: 1 is not of type 'string'"),
        ("changelog", "0.2.0: retrained", "changelog: '0.2.0: retrained' is not of type 'object'"),
        ("changelog", {"0.2.0": ["a"]}, "changelog.0.2.0: ['a'] is not of type 'string'"),
    ],
)
def test_wrong_type_or_value_fails_naming_the_path(dotted, value, expected):
    meta = with_value(dotted, value)
    if expected is None:
        assert metadata_errors(meta) == []
        return
    problems = problems_of(meta)
    assert any(p.startswith(expected) for p in problems), problems
    assert "\n" not in "".join(problems)


def test_every_problem_is_reported_at_once():
    meta = with_value(f"{INPUT}.num_channels", "two", without("task", without(f"{OUTPUT}.dtype")))
    meta["version"] = "0.3.0"
    assert problems_of(meta) == [
        "<top level>: missing required key 'task'",
        "changelog: no entry for the current version '0.3.0'",
        f"{INPUT}.num_channels: 'two' is not of type 'integer'",
        f"{OUTPUT}: missing required key 'dtype'",
    ]


def test_not_an_object():
    (problem,) = metadata_errors([valid_meta()])
    assert problem.startswith("<top level>: [{'schema': ") and problem.endswith("... is not of type 'object'")
    assert len(problem) < 150  # the offending value is shortened, not dumped


def test_unknown_profile():
    with pytest.raises(ValueError, match="profile"):
        metadata_errors(valid_meta(), profile="nnunet")


# --- Python-side cross-field rules -------------------------------------------------------------------------


def test_changelog_missing_the_current_version_fails():
    meta = with_value("version", "0.3.0")
    assert problems_of(meta) == ["changelog: no entry for the current version '0.3.0'"]
    assert problems_of(meta, profile="monai") == ["changelog: no entry for the current version '0.3.0'"]
    meta["changelog"]["0.3.0"] = "new weights"
    assert metadata_errors(meta) == []


@pytest.mark.parametrize("fmt", ["labels", "classes"])
@pytest.mark.parametrize(
    "channel_def",
    [
        {"0": "background", "1": "PZ"},  # too few
        {"0": "background", "1": "PZ", "2": "TZ", "3": "tumour"},  # too many
        {"0": "background", "1": "PZ", "3": "TZ"},  # right count, a gap
        {},
    ],
)
def test_one_channel_per_class_channel_def_must_match_num_channels(fmt, channel_def):
    meta = with_value(f"{OUTPUT}.channel_def", channel_def, with_value(f"{OUTPUT}.format", fmt))
    (problem,) = problems_of(meta)
    assert problem.startswith(f"{OUTPUT}.channel_def: format '{fmt}' has one channel per class")
    assert f"num_channels=3); found {len(channel_def)}" in problem


def test_channel_def_count_follows_num_channels():
    meta = with_value(f"{OUTPUT}.num_channels", 4)
    (problem,) = problems_of(meta)
    assert "('0'..'3', num_channels=4); found 3" in problem


@pytest.mark.parametrize(
    "num_channels, channel_def, ok",
    [
        (1, {"0": "background", "1": "PZ", "2": "TZ"}, True),  # the specification's one-channel label map
        (1, {"0": "spleen"}, True),
        (1, {}, False),
        (3, {"0": "background", "1": "PZ", "2": "TZ"}, True),  # several channels: one per class, as "labels"
        (3, {"0": "background", "1": "PZ"}, False),
    ],
)
def test_segmentation_output_names_its_classes(num_channels, channel_def, ok):
    meta = with_value(f"{OUTPUT}.format", "segmentation")
    meta = with_value(f"{OUTPUT}.num_channels", num_channels, meta)
    meta = with_value(f"{OUTPUT}.channel_def", channel_def, meta)
    problems = metadata_errors(meta)
    if ok:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(f"{OUTPUT}.channel_def: format 'segmentation'")


def test_channel_def_of_other_formats_is_not_counted():
    meta = with_value(f"{OUTPUT}.format", "magnitude")
    meta = with_value(f"{OUTPUT}.channel_def", {"0": "all"}, meta)
    assert metadata_errors(meta) == []


def test_spatial_rank_must_match_between_image_inputs_and_outputs():
    meta = with_value(f"{OUTPUT}.spatial_shape", [96, 96])
    assert problems_of(meta) == [
        f"{OUTPUT}.spatial_shape: 2 spatial dimensions [96, 96], but input 'image' has 3 [96, 96, 96]"
    ]
    assert metadata_errors(with_value(f"{OUTPUT}.spatial_shape", ["*", "*", "16*n"])) == []


def test_spatial_rank_of_non_image_outputs_is_free():
    meta = valid_meta()
    meta["network_data_format"]["outputs"]["grade"] = {
        "type": "probabilities",
        "format": "classes",
        "num_channels": 2,
        "spatial_shape": [],
        "dtype": "float32",
        "value_range": [0, 1],
        "is_patch_data": False,
        "channel_def": {"0": "benign", "1": "malignant"},
    }
    assert metadata_errors(meta) == []


# --- files and messages ------------------------------------------------------------------------------------


def test_invalid_file_message_names_the_file_and_lists_every_problem(tmp_path):
    path = tmp_path / "configs" / "metadata.json"
    path.parent.mkdir()
    path.write_text(json.dumps(without("copyright", with_value(f"{INPUT}.num_channels", "two"))), encoding="utf-8")
    with pytest.raises(MetadataError) as info:
        validate_metadata(path)
    assert info.value.source == str(path)
    assert str(info.value).splitlines() == [
        f"{path}: invalid bundle metadata (2 problems):",
        "  <top level>: missing required key 'copyright'",
        f"  {INPUT}.num_channels: 'two' is not of type 'integer'",
    ]
    with pytest.raises(MetadataError, match=f"^prostate \\({path}\\): invalid bundle metadata"):
        validate_metadata(path, name="prostate")


def test_invalid_dict_message_uses_the_name():
    with pytest.raises(MetadataError, match=r"^prostate bundle: invalid bundle metadata \(1 problem\):\n  "):
        validate_metadata(without("task"), name="prostate bundle")
    with pytest.raises(MetadataError, match=r"^metadata: invalid bundle metadata"):
        validate_metadata(without("task"))


@pytest.mark.parametrize(
    "content, reason",
    [
        ('{"version": "0.2.0",', "not valid JSON"),
        ("version: 0.2.0\n", "not valid JSON"),
        ("", "not valid JSON"),
        ('{"version": "0.1.0", "version": "0.2.0"}', "duplicate key 'version'"),
        ('{"eval_metrics": {"mean_dice": NaN}}', "NaN is not valid JSON"),
        (b"\xff\xfe{}", "cannot read"),
    ],
)
def test_unreadable_or_non_json_file_fails_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "metadata.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(MetadataError) as info:
        validate_metadata(path)
    assert str(info.value).startswith(f"{path}: ")
    assert reason in str(info.value)


def test_missing_file_fails_naming_the_file(tmp_path):
    path = tmp_path / "nowhere" / "metadata.json"
    with pytest.raises(MetadataError, match=f"^{path}: cannot read bundle metadata"):
        validate_metadata(path)


def test_json_that_is_not_an_object_fails(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(MetadataError, match=r"<top level>: \[1, 2\] is not of type 'object'"):
        validate_metadata(path)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(valid_meta()).encode())
    assert validate_metadata(path) == valid_meta()


def test_other_argument_types_are_refused():
    with pytest.raises(TypeError):
        validate_metadata(42)


def test_package_versions_under_either_name():
    """MONAI >= 1.4 reads ``required_packages_version`` and renames the spec's older ``optional_packages_version``
    to it; one of the two is mandatory."""
    meta = valid_meta()
    meta.pop("optional_packages_version", None)
    assert metadata_errors(meta) == []
    meta.pop("required_packages_version")
    assert metadata_errors(meta, profile="monai")  # neither name: the package versions are missing
    meta["optional_packages_version"] = {"nibabel": "5.2.1"}
    assert metadata_errors(meta, profile="monai") == []
