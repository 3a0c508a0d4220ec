"""How ComfyUI's answers are read: shapes taken from ComfyUI 0.3.75's server.py and execution.py."""

from __future__ import annotations

import pytest

from agent.comfy.protocol import combo_values, history_outcome, output_refs, prompt_refusal
from gpugate.errors import ExecutionError, Interrupted, OutOfMemory

PROMPT = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x"}}}


def test_a_refusal_names_the_bound_parameter() -> None:
    answer = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
              "node_errors": {"4": {"class_type": "CheckpointLoaderSimple", "errors": [
                  {"type": "value_not_in_list", "message": "Value not in list",
                   "details": "ckpt_name: 'x' not in []", "extra_info": {"input_name": "ckpt_name"}}]}}}
    error = prompt_refusal(answer, PROMPT, lambda node, name: "checkpoint" if (node, name) == ("4", "ckpt_name") else None)
    assert [(e.field, e.code) for e in error.errors] == [("checkpoint", "value_not_in_list")]
    assert error.message == "checkpoint: CheckpointLoaderSimple: Value not in list: ckpt_name: 'x' not in []"


def test_a_refusal_without_node_errors_keeps_comfyuis_words() -> None:
    answer = {"error": {"type": "invalid_prompt", "message": "Cannot execute because node Nope does not exist.",
                        "details": "Node ID '#1'"}, "node_errors": {}}
    error = prompt_refusal(answer, {}, lambda n, i: None)
    assert error.errors[0].field == "workflow" and "node Nope does not exist" in error.message


@pytest.mark.parametrize("exception_type, message, expected", [
    ("torch.OutOfMemoryError", "CUDA out of memory. Tried to allocate 2 GiB", OutOfMemory),
    ("torch.cuda.OutOfMemoryError", "", OutOfMemory),
    ("RuntimeError", "MPS backend out of memory", OutOfMemory),
    ("RuntimeError", "mat1 and mat2 shapes cannot be multiplied", ExecutionError),
])
def test_execution_errors_are_classified(exception_type: str, message: str, expected: type) -> None:
    entry = {"status": {"status_str": "error", "completed": False, "messages": [
        ["execution_start", {"prompt_id": "p"}],
        ["execution_error", {"node_id": "3", "node_type": "KSampler", "exception_type": exception_type,
                             "exception_message": message}]]}}
    with pytest.raises(expected) as info:
        history_outcome(entry)
    assert (info.value.node_id, info.value.node_type) == ("3", "KSampler")


def test_interrupted_and_unexplained_failures() -> None:
    with pytest.raises(Interrupted):
        history_outcome({"status": {"status_str": "error", "messages": [["execution_interrupted", {"node_id": "3"}]]}})
    with pytest.raises(ExecutionError, match="without saying why"):
        history_outcome({"status": {"status_str": "error", "messages": []}})


def test_every_kind_of_output_file_is_collected() -> None:
    outputs = {"9": {"images": [{"filename": "a.png", "subfolder": "j", "type": "output"}], "animated": [False]},
               "12": {"audio": [{"filename": "b.flac", "subfolder": "", "type": "output"}], "text": ["hello"]}}
    assert [(r.node_id, r.kind, r.filename) for r in output_refs(outputs)] == [("9", "images", "a.png"), ("12", "audio", "b.flac")]


def test_combo_values_in_both_schema_forms() -> None:
    info = {"A": {"input": {"required": {"x": [["p", "q"], {}]}, "optional": {"y": ["COMBO", {"options": ["r"]}]}}}}
    assert combo_values(info, "A", "x") == ["p", "q"]
    assert combo_values(info, "A", "y") == ["r"]
    assert combo_values(info, "A", "z") is None and combo_values(info, "B", "x") is None
