"""What an image model expects of its input: resize the short side, centre-crop, normalise. The image
prepare step (features.decode, features.image_prepare) follows it; the store's fingerprint covers it."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preprocessing:
    """What the model expects: resize the short side to ``resize``, centre-crop ``size``, normalise."""

    size: int
    resize: int
    interpolation: str  # "bicubic" / "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def transform(self, normalize: bool = True):
        """The reference transform for a PIL image (torchvision), matching timm's eval transform;
        ``normalize=False`` stops at the cropped PIL image."""
        from torchvision import transforms as T

        mode = T.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
        steps = [T.Resize(self.resize, interpolation=mode), T.CenterCrop(self.size)]
        if normalize:
            steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)


def preprocessing_of(size: int, crop_pct: float, interpolation: str, mean, std) -> Preprocessing:
    return Preprocessing(size, int(size / crop_pct), interpolation, tuple(map(float, mean)), tuple(map(float, std)))
