"""Fresh random test inputs with the value distributions quantization must survive."""
import torch

DISTRIBUTIONS = ("gaussian", "heavy_tailed", "outlier_channels")


def sample(shape, dist: str = "gaussian", seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Gaussian; Student-t with 3 dof (heavy tails); or Gaussian with a few columns scaled 50x (LLM-style outliers)."""
    g = torch.Generator().manual_seed(seed)
    if dist == "gaussian":
        x = torch.randn(shape, generator=g)
    elif dist == "heavy_tailed":
        # Student-t(3) = N / sqrt(chi2_3 / 3)
        n = torch.randn(shape, generator=g)
        chi2 = (torch.randn((3, *shape), generator=g) ** 2).sum(0)
        x = n / torch.sqrt(chi2 / 3)
    elif dist == "outlier_channels":
        x = torch.randn(shape, generator=g)
        cols = torch.randperm(shape[-1], generator=g)[: max(1, shape[-1] // 32)]
        x[..., cols] *= 50.0
    else:
        raise ValueError(dist)
    return x.to(dtype)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, computed in float64."""
    ref, approx = ref.detach().double(), approx.detach().double()
    noise = (ref - approx).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-300)))
