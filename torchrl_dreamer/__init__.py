"""torchrl_dreamer: DreamerV2 (Hafner et al., ICLR 2021) as TorchRL modules, losses and training."""
from torchrl_dreamer import modules, objectives

__version__ = "0.1.0"
__all__ = ["modules", "objectives", "__version__"]
