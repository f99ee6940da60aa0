"""Data layer and everything both stages share."""
import warnings

# timm 0.9.7 (pinned by segmentation-models-pytorch-3d) scripts a few activations with
# torch.jit at import, which newer torch releases flag as deprecated on every command.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.(script|interface)` is deprecated", category=FutureWarning)
