"""Facts about the GPU that launch grids are sized by."""
import torch

H100_SMS = 132


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; off the GPU (the interpreter, or meta tensors in a
    compile report), an H100 SXM's."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else H100_SMS
