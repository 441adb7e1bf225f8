import pytest
from hypothesis import given

import sparsedsl as sd
from sparsedsl.testing import invalid_declarations, patterns


@given(invalid_declarations())
def test_invalid_declarations_raise_pattern_error_naming_the_field(case):
    field, thunk = case
    with pytest.raises(sd.PatternError) as info:
        thunk()
    assert info.value.field.split("[")[0].split(" ")[0] in str(info.value)
    assert field.split(".")[0].split("[")[0] in info.value.field


@given(patterns())
def test_patterns_are_hashable_printable_and_lower(pattern):
    assert hash(pattern) == hash(pattern) and pattern == pattern
    assert pattern.name in str(pattern)
    schedule = sd.lower(pattern, num_heads=2, head_dim=4, dtype="float32")
    assert schedule == sd.lower(pattern, num_heads=2, head_dim=4, dtype="float32")
    assert schedule.key != sd.lower(pattern, num_heads=2, head_dim=8, dtype="float32").key


def test_error_message_shows_value_and_what_is_allowed():
    with pytest.raises(sd.PatternError, match=r"persistent.capacity = 0 is not allowed: an integer >= 1"):
        sd.Persistent(capacity=0)


def test_presets_are_written_in_the_dsl_and_compile():
    for name in sd.presets.PRESETS:
        program = sd.compile(sd.presets.get(name), backend="reference")
        assert isinstance(program.schedule, sd.Schedule)
    with pytest.raises(sd.PatternError, match="preset"):
        sd.presets.get("nope")
