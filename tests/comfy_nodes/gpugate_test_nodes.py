"""ComfyUI nodes that exist only for tests: they fail on demand, inside a real ComfyUI, so the
agent's classification of real execution errors (out of memory, other) is exercised end to end."""

import torch


class GpugateTestFail:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "error": (["out_of_memory", "runtime"],)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "gpugate/test"

    def run(self, image, error):
        if error == "out_of_memory":
            # What torch raises when a CUDA allocation fails; ComfyUI reports its type by name.
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        raise RuntimeError("deliberate failure for a test")


NODE_CLASS_MAPPINGS = {"GpugateTestFail": GpugateTestFail}
