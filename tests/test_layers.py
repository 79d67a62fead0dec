from quantize_pipeline.recipe.layers import matches, select

NAMES = ["model.layers.0.mlp.gate", "model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.q_proj", "lm_head"]


def test_plain_names_match_whole_name_or_last_parts():
    assert select(NAMES, ["lm_head"]) == ["lm_head"]
    assert select(NAMES, ["gate"]) == ["model.layers.0.mlp.gate"]
    assert not matches("model.layers.0.mlp.gate_proj", "gate")


def test_globs_and_regexes():
    assert select(NAMES, ["*.q_proj"]) == ["model.layers.1.self_attn.q_proj"]
    assert select(NAMES, ["re:.*mlp\\.gate$"]) == ["model.layers.0.mlp.gate"]
    assert select(NAMES, ["re:model\\.layers\\.0\\."]) == NAMES[:2]
