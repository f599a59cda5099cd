"""The document's ResNet18, kept layer for layer: shapes, quirks, state-dict layout, equivalence.

The design document (``../shared/seed/000_*.txt``) ends with a reference implementation. It is
pasted below verbatim (``DOC_CODE``) and executed, so these tests compare our model with the
document's own code rather than with a paraphrase of it, without needing ``../shared``.
"""

from __future__ import annotations

import contextlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_serve.export import CIFAR10_MEAN, CIFAR10_STD, ResBlk, ResNet18, ServingModel

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "models" / "resnet18_cifar10.pt"
SAMPLE_ZIP = Path(__file__).resolve().parent / "fixtures" / "cifar10-test-sample.zip"

# The "代码" (code) section of the design document, verbatim (only trailing blank lines dropped).
DOC_CODE = """import torch
from torch import nn
from torch.nn import functional as F


class ResBlk(nn.Module):
    '''
    resnet block
    '''
    def __init__(self,ch_in,ch_out,stride=1):
        '''

        :param ch_in:
        :param ch_out:
        '''
        super(ResBlk, self).__init__()

        self.con1=nn.Conv2d(ch_in,ch_out,kernel_size=3,stride=stride,padding=1)
        self.bn1=nn.BatchNorm2d(ch_out)
        self.con2=nn.Conv2d(ch_out,ch_out,kernel_size=3,stride=1,padding=1)
        self.bn2=nn.BatchNorm2d(ch_out)

        self.extra=nn.Sequential()
        if ch_out != ch_in:
            self.extra=nn.Sequential(
                nn.Conv2d(ch_in,ch_out,kernel_size=1,stride=stride),
                nn.BatchNorm2d(ch_out)
            )





    def forward(self,x):
        '''

        :param x:[b,ch,h,w]
        :return:
        '''

        out=F.relu(self.bn1(self.con1(x)))
        out=self.bn2(self.con2(out))
        # short cut
        # extra model:[b,ch_in,h,w] with [b,ch_out,h,w]
        out=self.extra(x)+out

        return out

class ResNet18(nn.Module):
    def __init__(self):
        super(ResNet18, self).__init__()

        self.conv1=nn.Sequential(
            nn.Conv2d(3,64,kernel_size=3,stride=3,padding=0),
            nn.BatchNorm2d(64)
        )
        # followed 4 blocks
        #[b,64,h,w]->[b,128,h,w]
        self.blk1=ResBlk(64,128,stride=2)
        # [b,128,h,w]->[b,2556,h,w]
        self.blk2=ResBlk(128,256,stride=2)
        # [b,256,h,w]->[b,512,h,w]
        self.blk3=ResBlk(256,512,stride=2)
        # [b,512,h,w]->[b,1024,h,w]
        self.blk4=ResBlk(512,512,stride=2)


        self.outlay=nn.Linear(512*1*1,10)


    def forward(self,x):
        '''

        :param x:
        :return:
        '''
        x=F.relu(self.conv1(x))

        # [b,64,h,w]->[b,1024,h,w]
        x=self.blk1(x)
        x=self.blk2(x)
        x=self.blk3(x)
        x=self.blk4(x)

        # print('after conv:', x.shape)
        # x=self.outlay(x)
        x=F.adaptive_avg_pool2d(x,[1,1])

        x=x.view(x.size(0),-1)
        x=self.outlay(x)

        return x


def main():
    blk=ResBlk(64,128,stride=4)

    tmp=torch.randn(2,64,32,32)
    out=blk(tmp)
    print('block:',out.shape)

    x=torch.randn(2,3,32,32)
    model=ResNet18()
    out=model(x)
    print('resnet:',out.shape)




if __name__ == '__main__':
    main()
"""


def _doc_module() -> dict[str, object]:
    """Run the document's code in its own namespace; returns its globals."""
    ns: dict[str, object] = {"__name__": "design_document"}
    exec(compile(DOC_CODE, "<design-document>", "exec"), ns)
    return ns


DOC = _doc_module()
DocResBlk = DOC["ResBlk"]
DocResNet18 = DOC["ResNet18"]

# Every parameter and buffer of ResNet18().state_dict(), in order, with its shape. Checkpoints
# written by the document's code (and by ours) depend on exactly this layout.
EXPECTED_STATE_DICT: list[tuple[str, tuple[int, ...]]] = [
    ("conv1.0.weight", (64, 3, 3, 3)),
    ("conv1.0.bias", (64,)),
    ("conv1.1.weight", (64,)),
    ("conv1.1.bias", (64,)),
    ("conv1.1.running_mean", (64,)),
    ("conv1.1.running_var", (64,)),
    ("conv1.1.num_batches_tracked", ()),
    ("blk1.con1.weight", (128, 64, 3, 3)),
    ("blk1.con1.bias", (128,)),
    ("blk1.bn1.weight", (128,)),
    ("blk1.bn1.bias", (128,)),
    ("blk1.bn1.running_mean", (128,)),
    ("blk1.bn1.running_var", (128,)),
    ("blk1.bn1.num_batches_tracked", ()),
    ("blk1.con2.weight", (128, 128, 3, 3)),
    ("blk1.con2.bias", (128,)),
    ("blk1.bn2.weight", (128,)),
    ("blk1.bn2.bias", (128,)),
    ("blk1.bn2.running_mean", (128,)),
    ("blk1.bn2.running_var", (128,)),
    ("blk1.bn2.num_batches_tracked", ()),
    ("blk1.extra.0.weight", (128, 64, 1, 1)),
    ("blk1.extra.0.bias", (128,)),
    ("blk1.extra.1.weight", (128,)),
    ("blk1.extra.1.bias", (128,)),
    ("blk1.extra.1.running_mean", (128,)),
    ("blk1.extra.1.running_var", (128,)),
    ("blk1.extra.1.num_batches_tracked", ()),
    ("blk2.con1.weight", (256, 128, 3, 3)),
    ("blk2.con1.bias", (256,)),
    ("blk2.bn1.weight", (256,)),
    ("blk2.bn1.bias", (256,)),
    ("blk2.bn1.running_mean", (256,)),
    ("blk2.bn1.running_var", (256,)),
    ("blk2.bn1.num_batches_tracked", ()),
    ("blk2.con2.weight", (256, 256, 3, 3)),
    ("blk2.con2.bias", (256,)),
    ("blk2.bn2.weight", (256,)),
    ("blk2.bn2.bias", (256,)),
    ("blk2.bn2.running_mean", (256,)),
    ("blk2.bn2.running_var", (256,)),
    ("blk2.bn2.num_batches_tracked", ()),
    ("blk2.extra.0.weight", (256, 128, 1, 1)),
    ("blk2.extra.0.bias", (256,)),
    ("blk2.extra.1.weight", (256,)),
    ("blk2.extra.1.bias", (256,)),
    ("blk2.extra.1.running_mean", (256,)),
    ("blk2.extra.1.running_var", (256,)),
    ("blk2.extra.1.num_batches_tracked", ()),
    ("blk3.con1.weight", (512, 256, 3, 3)),
    ("blk3.con1.bias", (512,)),
    ("blk3.bn1.weight", (512,)),
    ("blk3.bn1.bias", (512,)),
    ("blk3.bn1.running_mean", (512,)),
    ("blk3.bn1.running_var", (512,)),
    ("blk3.bn1.num_batches_tracked", ()),
    ("blk3.con2.weight", (512, 512, 3, 3)),
    ("blk3.con2.bias", (512,)),
    ("blk3.bn2.weight", (512,)),
    ("blk3.bn2.bias", (512,)),
    ("blk3.bn2.running_mean", (512,)),
    ("blk3.bn2.running_var", (512,)),
    ("blk3.bn2.num_batches_tracked", ()),
    ("blk3.extra.0.weight", (512, 256, 1, 1)),
    ("blk3.extra.0.bias", (512,)),
    ("blk3.extra.1.weight", (512,)),
    ("blk3.extra.1.bias", (512,)),
    ("blk3.extra.1.running_mean", (512,)),
    ("blk3.extra.1.running_var", (512,)),
    ("blk3.extra.1.num_batches_tracked", ()),
    ("blk4.con1.weight", (512, 512, 3, 3)),
    ("blk4.con1.bias", (512,)),
    ("blk4.bn1.weight", (512,)),
    ("blk4.bn1.bias", (512,)),
    ("blk4.bn1.running_mean", (512,)),
    ("blk4.bn1.running_var", (512,)),
    ("blk4.bn1.num_batches_tracked", ()),
    ("blk4.con2.weight", (512, 512, 3, 3)),
    ("blk4.con2.bias", (512,)),
    ("blk4.bn2.weight", (512,)),
    ("blk4.bn2.bias", (512,)),
    ("blk4.bn2.running_mean", (512,)),
    ("blk4.bn2.running_var", (512,)),
    ("blk4.bn2.num_batches_tracked", ()),
    ("outlay.weight", (10, 512)),
    ("outlay.bias", (10,)),
]


def _sample_images(n: int) -> np.ndarray:
    """``n`` real CIFAR-10 test images (uint8 NHWC), spread over the classes."""
    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        names = sorted(name for name in zf.namelist() if name.endswith(".jpg"))
        step = max(1, len(names) // n)
        picked = names[::step][:n]
        return np.stack([np.asarray(Image.open(io.BytesIO(zf.read(name))).convert("RGB")) for name in picked])


def _normalize(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _shipped_state_dict() -> dict[str, torch.Tensor]:
    ckpt = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    return ckpt["model"]


# --------------------------------------------------------------------------- document smoke checks


def test_document_main_prints_the_documented_shapes() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        DOC["main"]()  # type: ignore[operator]
    assert out.getvalue().splitlines() == ["block: torch.Size([2, 128, 8, 8])", "resnet: torch.Size([2, 10])"]


@pytest.mark.parametrize(
    ("stride", "expected"),
    [(1, (2, 128, 32, 32)), (2, (2, 128, 16, 16)), (4, (2, 128, 8, 8))],
)
def test_resblk_shapes(stride: int, expected: tuple[int, ...]) -> None:
    blk = ResBlk(64, 128, stride=stride)
    out = blk(torch.randn(2, 64, 32, 32))
    assert tuple(out.shape) == expected


def test_resnet18_output_shape() -> None:
    torch.manual_seed(0)
    out = ResNet18()(torch.randn(2, 3, 32, 32))
    assert tuple(out.shape) == (2, 10)
    assert out.dtype == torch.float32


def test_feature_map_walkthrough() -> None:
    """Stride-3 stem: 32 -> 10 -> 5 -> 3 -> 2, and blk4 keeps 2x2 by broadcasting."""
    torch.manual_seed(0)
    model = ResNet18().eval()
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda _m, _i, o, name=name: shapes.__setitem__(name, tuple(o.shape))
        )
        for name in ("conv1", "blk1", "blk2", "blk3", "blk4")
    ]
    with torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert shapes == {
        "conv1": (3, 64, 10, 10),
        "blk1": (3, 128, 5, 5),
        "blk2": (3, 256, 3, 3),
        "blk3": (3, 512, 2, 2),
        "blk4": (3, 512, 2, 2),
    }


# --------------------------------------------------------------------------- the document's quirks


def test_blk4_identity_shortcut_broadcasts() -> None:
    torch.manual_seed(0)
    model = ResNet18().eval()
    blk4 = model.blk4
    assert isinstance(blk4.extra, torch.nn.Sequential) and len(blk4.extra) == 0  # identity shortcut
    assert blk4.con1.stride == (2, 2)
    for blk in (model.blk1, model.blk2, model.blk3):
        assert len(blk.extra) == 2  # 1x1 conv + BN when the channels change

    x = torch.randn(4, 512, 2, 2)
    with torch.no_grad():
        residual = blk4.bn2(blk4.con2(torch.relu(blk4.bn1(blk4.con1(x)))))
        out = blk4(x)
    assert tuple(residual.shape) == (4, 512, 1, 1)
    assert tuple(out.shape) == (4, 512, 2, 2)
    # [b,512,2,2] + [b,512,1,1]: every spatial position gets the same residual added.
    torch.testing.assert_close(out, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(out - x, residual.expand(4, 512, 2, 2), rtol=1e-6, atol=1e-6)


def test_no_relu_after_residual_sum() -> None:
    torch.manual_seed(0)
    model = ResNet18().eval()
    x = torch.randn(2, 3, 32, 32)
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(model, name).register_forward_hook(lambda _m, _i, o, name=name: outputs.__setitem__(name, o))
        for name in ("blk1", "blk2", "blk3", "blk4")
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for name, out in outputs.items():
        assert (out < 0).any(), f"{name} output is non-negative: a ReLU after the sum?"

    blk = model.blk2
    z = torch.randn(2, 128, 8, 8)
    with torch.no_grad():
        expected = blk.extra(z) + blk.bn2(blk.con2(torch.relu(blk.bn1(blk.con1(z)))))
        torch.testing.assert_close(blk(z), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- state-dict layout


def test_state_dict_names_and_shapes_are_pinned() -> None:
    sd = ResNet18().state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == EXPECTED_STATE_DICT
    assert len(EXPECTED_STATE_DICT) == 86
    for k, v in sd.items():
        expected_dtype = torch.int64 if k.endswith("num_batches_tracked") else torch.float32
        assert v.dtype == expected_dtype, k
    params = ResNet18().named_parameters()
    assert sum(p.numel() for _, p in params) == 9_553_674


def test_shipped_checkpoint_has_the_pinned_layout() -> None:
    sd = _shipped_state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == EXPECTED_STATE_DICT


# --------------------------------------------------------------------------- equivalence with the document


def test_same_seed_gives_same_initial_weights_as_document() -> None:
    """Same modules created in the same order: identical initialisation."""
    torch.manual_seed(123)
    doc = DocResNet18()  # type: ignore[operator]
    torch.manual_seed(123)
    ours = ResNet18()
    doc_sd, our_sd = doc.state_dict(), ours.state_dict()
    assert list(doc_sd) == list(our_sd)
    for k in doc_sd:
        assert torch.equal(doc_sd[k], our_sd[k]), k


def _randomize_bn_stats(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine parameters, so eval mode really uses them."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            assert m.running_mean is not None and m.running_var is not None
            assert m.num_batches_tracked is not None
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
            m.num_batches_tracked.fill_(7)


def test_document_checkpoint_loads_into_ours_strictly(tmp_path: Path) -> None:
    torch.manual_seed(1)
    doc = DocResNet18()  # type: ignore[operator]
    _randomize_bn_stats(doc, 1)
    path = tmp_path / "doc.pt"
    torch.save(doc.state_dict(), path)  # what the document's users would save

    ours = ResNet18()
    result = ours.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    doc.eval()
    ours.eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), doc(x), rtol=0, atol=0)


def test_our_checkpoint_loads_into_document_strictly(tmp_path: Path) -> None:
    torch.manual_seed(2)
    ours = ResNet18()
    _randomize_bn_stats(ours, 2)
    path = tmp_path / "ours.pt"
    torch.save(ours.state_dict(), path)

    doc = DocResNet18()  # type: ignore[operator]
    doc.load_state_dict(torch.load(path, weights_only=True), strict=True)
    doc.eval()
    ours.eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(doc(x), ours(x), rtol=0, atol=0)
    # Training mode (batch statistics) agrees as well.
    doc.train()
    ours.train()
    torch.testing.assert_close(doc(x), ours(x), rtol=0, atol=0)


def test_shipped_weights_run_identically_in_the_document_model() -> None:
    sd = _shipped_state_dict()
    doc = DocResNet18()  # type: ignore[operator]
    doc.load_state_dict(sd, strict=True)
    ours = ResNet18()
    ours.load_state_dict(sd, strict=True)
    x = _normalize(_sample_images(40))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), doc.eval()(x), rtol=0, atol=0)


def test_load_state_dict_rejects_a_foreign_layout() -> None:
    sd = ResNet18().state_dict()
    sd["blk4.extra.0.weight"] = torch.zeros(512, 512, 1, 1)  # a "fixed" blk4 with a projection
    with pytest.raises(RuntimeError, match="Unexpected key"):
        ResNet18().load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------- serving wrapper


def test_serving_model_matches_manual_normalization() -> None:
    net = ResNet18()
    net.load_state_dict(_shipped_state_dict(), strict=True)
    net.eval()
    serving = ServingModel(net).eval()
    images = _sample_images(64)
    assert images.dtype == np.uint8 and images.shape == (64, 32, 32, 3)
    with torch.no_grad():
        got = serving(torch.from_numpy(images))
        want = net(_normalize(images))
    assert got.dtype == torch.float32 and tuple(got.shape) == (64, 10)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_serving_model_folds_normalization_exactly() -> None:
    """The in-graph multiply-add equals (x/255 - mean)/std to float32 rounding."""
    serving = ServingModel(ResNet18())
    pixels = torch.arange(256, dtype=torch.uint8).repeat(3, 1).T.reshape(256, 1, 1, 3)
    folded = pixels.permute(0, 3, 1, 2).to(torch.float32) * serving.scale + serving.shift
    torch.testing.assert_close(folded, _normalize(pixels.numpy()), rtol=0, atol=2e-6)


def test_serving_model_uses_checkpoint_statistics() -> None:
    serving = ServingModel(ResNet18(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    x = torch.full((1, 1, 1, 3), 255, dtype=torch.uint8).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(
        (x * serving.scale + serving.shift).flatten(), torch.tensor([2.0, 1.0, 0.5]), rtol=0, atol=1e-6
    )
