"""Any timm classifier by name (`timm:<name>`), adapted to the dataset's classes, input channels and image size.

timm is the model zoo most image-classification users already have; it is an optional extra
(`pip install 'valley-ensembles[timm]'`). Models are built without pretrained weights, so nothing
is downloaded: weights trained elsewhere (timm's own, saved with `torch.save(model.state_dict())`)
come in through `--init`.
"""

from __future__ import annotations

import difflib

from torch import nn

from training.errors import UsageError


def timm_classifier(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """timm's `name`, from scratch, with `num_classes` outputs and `in_channels` inputs (timm adapts both)."""
    try:
        import timm
    except ImportError as error:
        raise UsageError(f"timm:{name} needs timm: pip install 'valley-ensembles[timm]' (or pip install timm)"
                         ) from error
    available = timm.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown timm model {name!r}{hint} (timm.list_models() lists them)")
    try:
        # Transformers and other fixed-size models take the image size; convolutional ones do not.
        network: nn.Module = timm.create_model(name, pretrained=False, num_classes=num_classes,
                                               in_chans=in_channels, img_size=image_size)
    except TypeError:
        network = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    return network
