"""An independent NumPy re-implementation of torchvision's ResNet forward pass in eval mode.

Written from torchvision's `models/resnet.py` (not from our Keras model): NCHW tensors, OIHW
kernels, torchvision state-dict names, float64 arithmetic. It exists to show that
`keras_resnet.model` computes what torchvision computes for the same weights.

- conv2d: zero padding `k // 2` on every side (PyTorch `padding=k//2`), then a strided
  correlation, `out = floor((in + 2p - k) / s) + 1`.
- BatchNorm2d eval: `(x - running_mean) / sqrt(running_var + 1e-5) * weight + bias`.
- stem: conv 7x7/2 -> bn -> relu -> maxpool 3x3/2 with padding 1 filled with -inf.
- BasicBlock: conv3x3(stride) bn relu conv3x3 bn (+ identity or downsample) relu.
- Bottleneck v1.5 (torchvision): conv1x1 bn relu conv3x3(stride) bn relu conv1x1 bn (+ ...) relu;
  v1 (the paper) puts the stride on the first 1x1 instead.
- downsample: conv1x1(stride) + bn where the stride is not 1 or the channel count changes.
- head: adaptive average pool to 1x1, flatten, fc (`x @ W.T + b`).
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

BN_EPS = 1e-5
BLOCKS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
          152: ("bottleneck", (3, 8, 36, 3))}


def conv2d(x, weight, stride=1, bias=None):
    """PyTorch `F.conv2d(x, weight, bias, stride, padding=k // 2)`: x NCHW, weight OIHW."""
    _, _, k_h, k_w = weight.shape
    p_h, p_w = k_h // 2, k_w // 2
    x = np.pad(x, ((0, 0), (0, 0), (p_h, p_h), (p_w, p_w)))
    patches = sliding_window_view(x, (k_h, k_w), axis=(2, 3))[:, :, ::stride, ::stride]
    # patches: N, C, H_out, W_out, k_h, k_w
    out = np.tensordot(patches, weight, axes=([1, 4, 5], [1, 2, 3]))  # N, H_out, W_out, O
    out = out.transpose(0, 3, 1, 2)
    if bias is not None:
        out = out + bias[None, :, None, None]
    return out


def batch_norm(x, sd, prefix):
    """BatchNorm2d in eval mode (running statistics), eps 1e-5."""
    def p(name):
        return sd[f"{prefix}.{name}"][None, :, None, None]

    return (x - p("running_mean")) / np.sqrt(p("running_var") + BN_EPS) * p("weight") + p("bias")


def max_pool_3x3_s2(x):
    """`nn.MaxPool2d(kernel_size=3, stride=2, padding=1)`: the padding never wins (-inf)."""
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(4, 5))


def relu(x):
    return np.maximum(x, 0.0)


def _conv(x, sd, name, stride=1):
    return conv2d(x, sd[f"{name}.weight"], stride, sd.get(f"{name}.bias"))


def _block(x, sd, prefix, kind, stride, variant):
    if kind == "basic":
        out = relu(batch_norm(_conv(x, sd, f"{prefix}.conv1", stride), sd, f"{prefix}.bn1"))
        out = batch_norm(_conv(out, sd, f"{prefix}.conv2"), sd, f"{prefix}.bn2")
    else:
        s1, s3 = (1, stride) if variant == "v1.5" else (stride, 1)
        out = relu(batch_norm(_conv(x, sd, f"{prefix}.conv1", s1), sd, f"{prefix}.bn1"))
        out = relu(batch_norm(_conv(out, sd, f"{prefix}.conv2", s3), sd, f"{prefix}.bn2"))
        out = batch_norm(_conv(out, sd, f"{prefix}.conv3"), sd, f"{prefix}.bn3")
    if f"{prefix}.downsample.0.weight" in sd:
        identity = batch_norm(_conv(x, sd, f"{prefix}.downsample.0", stride), sd,
                              f"{prefix}.downsample.1")
    else:
        identity = x
    return relu(out + identity)


def resnet_forward(state_dict, images_nhwc, depth, variant="v1.5"):
    """Logits (N, num_classes), float64, of torchvision's resnet{depth} in eval mode.

    `images_nhwc` are already-normalised float images, channels last (converted to NCHW here).
    """
    sd = {k: np.asarray(v, np.float64) for k, v in state_dict.items()
          if not k.endswith("num_batches_tracked")}
    kind, blocks = BLOCKS[depth]
    x = np.asarray(images_nhwc, np.float64).transpose(0, 3, 1, 2)
    x = relu(batch_norm(_conv(x, sd, "conv1", 2), sd, "bn1"))
    x = max_pool_3x3_s2(x)
    for stage, num_blocks in enumerate(blocks):
        for block in range(num_blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _block(x, sd, f"layer{stage + 1}.{block}", kind, stride, variant)
    x = x.mean(axis=(2, 3))
    return x @ sd["fc.weight"].T + sd["fc.bias"]


def random_state_dict(depth, num_classes=10, seed=0, conv_bias=False):
    """A random torchvision-named state dict with non-trivial BatchNorm statistics and gammas.

    Kernels are He-normal (fan-in) and BatchNorm statistics are near the unit scale, so activations
    neither vanish nor explode through 50 layers and every layer affects the logits.
    """
    rng = np.random.default_rng(seed)
    kind, blocks = BLOCKS[depth]
    expansion = 1 if kind == "basic" else 4
    sd = {}

    def conv(name, c_in, c_out, k):
        sd[f"{name}.weight"] = rng.normal(0, np.sqrt(2.0 / (c_in * k * k)),
                                          (c_out, c_in, k, k)).astype(np.float32)
        if conv_bias:
            sd[f"{name}.bias"] = rng.normal(0, 0.1, c_out).astype(np.float32)

    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.bias"] = rng.normal(0, 0.2, c).astype(np.float32)
        sd[f"{name}.running_mean"] = rng.normal(0, 0.2, c).astype(np.float32)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        sd[f"{name}.num_batches_tracked"] = np.array(100, np.int64)

    conv("conv1", 3, 64, 7)
    bn("bn1", 64)
    c_in = 64
    for stage, num_blocks in enumerate(blocks):
        width = 64 * 2**stage
        for block in range(num_blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            p = f"layer{stage + 1}.{block}"
            if kind == "basic":
                conv(f"{p}.conv1", c_in, width, 3)
                bn(f"{p}.bn1", width)
                conv(f"{p}.conv2", width, width, 3)
                bn(f"{p}.bn2", width)
            else:
                conv(f"{p}.conv1", c_in, width, 1)
                bn(f"{p}.bn1", width)
                conv(f"{p}.conv2", width, width, 3)
                bn(f"{p}.bn2", width)
                conv(f"{p}.conv3", width, width * expansion, 1)
                bn(f"{p}.bn3", width * expansion)
            if stride != 1 or c_in != width * expansion:
                conv(f"{p}.downsample.0", c_in, width * expansion, 1)
                bn(f"{p}.downsample.1", width * expansion)
            c_in = width * expansion
    sd["fc.weight"] = rng.normal(0, 1.0 / np.sqrt(c_in), (num_classes, c_in)).astype(np.float32)
    sd["fc.bias"] = rng.normal(0, 0.1, num_classes).astype(np.float32)
    return sd
