"""The `onnx` engine: an `fdm-export onnx` file run by onnxruntime.

CPU: CPUExecutionProvider, tensors converted through numpy (no copy for contiguous float32).
CUDA (when onnxruntime-gpu is installed): CUDAExecutionProvider with IO binding, so inputs and
outputs are torch CUDA tensors bound by pointer and never leave the GPU.
The model config (K, image size, classes) comes from the file's metadata (the `fdm.*` entries of its
metadata_props), written by fdm_core.onnx_format (for fdm_export.onnx_export's files and for the graphs
traced here).

The masks alone (`masks`, what segmentation reads) run in a second session over the part of the graph
that computes them: onnxruntime runs every node of a graph whatever outputs are asked for, and the masks
need neither the K decoder branches nor the masked sum, most of the model's work. A checkpoint runs here
too (`from_checkpoint`): its graphs are traced in memory when first needed, one per task.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fdm_core.config import ModelConfig
from fdm_core.errors import UserError, one_line
from fdm_core.onnx_format import FORMAT, MASKS_ONLY, OUTPUT_NAMES, input_names, onnx_model_bytes
from fdm_infer.engines.base import Engine


def session_options(threads: int | None = None, spinning: bool | None = None):
    """onnxruntime session options: quiet, `threads` intra-op threads, and threads that sleep instead of
    spinning while they wait whenever OpenMP's are passive (fdm's default, fdm_core/__init__.py): spinning
    onnxruntime threads slow down every other busy process on a small machine, as OpenMP's do
    (benchmarks/threads/threads.md). `spinning` True or False decides it instead (the benchmarks)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if spinning is None:
        spinning = os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


def read_onnx_metadata(path: str | Path) -> dict:
    """The fdm metadata of an exported file (without loading its weights into a session)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:
        raise UserError(f"{path} is not a readable ONNX model ({one_line(exc)})") from None
    return metadata_from_props({p.key: p.value for p in proto.metadata_props}, path)


def metadata_from_props(props: dict[str, str], path: str | Path) -> dict:
    """Validate fdm.* metadata; returns {'config': ModelConfig, 'dtype': ..., ...}."""
    if props.get("fdm.format") != FORMAT or "fdm.config" not in props:
        raise UserError(f"{path} is not an fdm ONNX export (no fdm model config in its metadata); "
                        "make one with `fdm-export onnx CHECKPOINT -o FILE`")
    try:
        cfg = ModelConfig.from_json(props["fdm.config"])
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path} has an invalid model config in its metadata: {one_line(exc)}") from None
    meta = {k[4:]: v for k, v in props.items() if k.startswith("fdm.")}
    meta["config"] = cfg
    return meta


def masks_graph(onnx_bytes: bytes, inputs: list[str]) -> bytes:
    """The part of an exported denoiser's graph that computes its masks: (inputs) -> masks."""
    import onnx
    import onnx.utils

    proto = onnx.load_model_from_string(onnx_bytes)
    return onnx.utils.Extractor(proto).extract_model(inputs, MASKS_ONLY).SerializeToString()


class OnnxEngine(Engine):
    name = "onnx"

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"ONNX model not found: {path}")
        self._open_device(device, threads)
        self._graphs: dict[str, Callable[[], bytes]] = {"masks": lambda: masks_graph(path.read_bytes(), self.input_names)}
        try:
            self._sessions = {"full": self._session(str(path))}
        except Exception as exc:
            raise UserError(f"{path} is not a loadable ONNX model ({one_line(exc)})") from None
        meta = metadata_from_props(self.session.get_modelmeta().custom_metadata_map, path)
        self.config = meta.pop("config")
        self.metadata = meta
        self.path = path
        self.input_names = [i.name for i in self.session.get_inputs()]
        expected = input_names(self.config)
        outputs = [o.name for o in self.session.get_outputs()]
        if self.input_names != expected or outputs != OUTPUT_NAMES:
            raise UserError(f"{path}: graph inputs {self.input_names} / outputs {outputs} do not match its "
                            f"metadata (expected {expected} -> {OUTPUT_NAMES})")
        self._check_graph_shapes(path)
        # A file exported with a fixed batch (its x_t's first dimension a number) runs in batches of that size.
        batch = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str = "auto", threads: int | None = None) -> OnnxEngine:
        """A checkpoint's model (EMA weights, float32) run by onnxruntime: each graph (the masks alone, or the
        whole denoiser) traced in memory the first time it is needed."""
        from fdm_core.checkpoint import load_model

        model, _, metadata = load_model(checkpoint, weights="ema", map_location="cpu")
        engine = cls.from_model(model, device=device, threads=threads)
        engine.path, engine.metadata = Path(checkpoint), metadata
        return engine

    @classmethod
    def from_model(cls, model: nn.Module, device: str = "auto", threads: int | None = None,
                   spinning: bool | None = None) -> OnnxEngine:
        """An in-memory model (float32) run by onnxruntime, traced when first needed (benchmarks, tests)."""
        engine = cls.__new__(cls)
        engine._open_device(device, threads, spinning)
        weights = next(model.parameters())
        if weights.device.type != "cpu" or weights.dtype != torch.float32:  # traced on the CPU in float32
            model = copy.deepcopy(model).cpu().float()
        model.eval()
        engine.config, engine.metadata, engine.path = model.cfg, {}, None
        engine.input_names = input_names(model.cfg)
        engine.fixed_batch = None
        engine._graphs = {"full": lambda: onnx_model_bytes(model),
                          "masks": lambda: onnx_model_bytes(model, masks_only=True)}
        engine._sessions = {}
        return engine

    def _open_device(self, device: str, threads: int | None, spinning: bool | None = None) -> None:
        """The device and execution providers, and the options of every session (`threads` None: as many
        as torch uses, so that both engines compare alike)."""
        import onnxruntime as ort

        available = ort.get_available_providers()
        has_cuda_ep = "CUDAExecutionProvider" in available
        if device == "auto":
            device = "cuda" if has_cuda_ep and torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not has_cuda_ep:
                raise UserError("onnxruntime here has no CUDAExecutionProvider: install onnxruntime-gpu "
                                "(in place of onnxruntime) or use `device` cpu", ("device",))
            if not torch.cuda.is_available():
                raise UserError("`device` cuda asked for, but torch sees no CUDA device", ("device",))
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        elif self.device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise UserError(f"the onnx engine runs on cpu or cuda, not {device!r}")
        self._providers = providers
        self._options = session_options(threads or torch.get_num_threads(), spinning)
        self._options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    def _session(self, graph: str | bytes):
        import onnxruntime as ort

        return ort.InferenceSession(graph, self._options, providers=self._providers)

    def _session_for(self, graph: str):
        """The session of `graph` ("full": the denoiser, "masks": the masks alone), made when first asked for."""
        if graph not in self._sessions:
            self._sessions[graph] = self._session(self._graphs[graph]())
        return self._sessions[graph]

    @property
    def session(self):
        """The session of the whole denoiser."""
        return self._session_for("full")

    def _check_graph_shapes(self, path: Path) -> None:
        """The graph's x_t, eps and masks have the sizes the metadata's config gives (the batch aside)."""
        cfg = self.config
        size = [cfg.image_size, cfg.image_size]
        want = {"x_t": [cfg.in_channels, *size], "eps": [cfg.in_channels, *size],
                "masks": [cfg.mask_channels, *size]}
        for arg in (*self.session.get_inputs(), *self.session.get_outputs()):
            if arg.name not in want:
                continue
            dims = list(arg.shape[1:])  # a size onnxruntime could not infer is a name, not a number
            if len(dims) != 3 or any(isinstance(d, int) and d != w for d, w in zip(dims, want[arg.name])):
                raise UserError(f"{path}: the graph's {arg.name} is {list(arg.shape)}, its metadata describes "
                                f"[batch, {', '.join(map(str, want[arg.name]))}]; re-export it with fdm-export")

    def _check(self, x_t, y):
        cfg = self.config
        want = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x_t.dim() != 4 or tuple(x_t.shape[1:]) != want:
            raise ValueError(f"x_t must be [B, {want[0]}, {want[1]}, {want[2]}] for this model, got {list(x_t.shape)}")
        if cfg.num_classes and y is None:
            raise ValueError("this model is class-conditional: pass class labels y")

    def denoise(self, x_t, t, y=None):
        self._check(x_t, y)
        return tuple(self._in_runs("full", x_t, t, y))

    def masks(self, x_t, t, y=None):
        self._check(x_t, y)
        return self._in_runs("masks", x_t, t, y)[0]

    def _in_runs(self, graph: str, x_t, t, y) -> list[torch.Tensor]:
        """The outputs of `graph` on the batch; a fixed-batch graph runs it in runs of its batch size, the
        last filled up with copies of its last image."""
        n, b = self.fixed_batch, x_t.shape[0]
        if n is None or b == n:
            return self._run(graph, x_t, t, y)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(-1)
        runs = []
        for first in range(0, b, n):
            rows = torch.arange(first, first + n).clamp_(max=b - 1)
            outputs = self._run(graph, x_t[rows], t[rows], None if y is None else y.reshape(-1)[rows])
            runs.append([o[:min(n, b - first)] for o in outputs])
        return [torch.cat(parts) for parts in zip(*runs)]

    def _run(self, graph: str, x_t, t, y) -> list[torch.Tensor]:
        names = OUTPUT_NAMES if graph == "full" else MASKS_ONLY
        session = self._session_for(graph)
        if self.device.type == "cuda":
            outputs = self._run_cuda(session, names, x_t, t, y)
        else:
            feeds = {"x_t": x_t.detach().to("cpu", torch.float32).contiguous().numpy(),
                     "t": t.detach().to("cpu", torch.int64).reshape(-1).contiguous().numpy()}
            if self.config.num_classes:
                feeds["y"] = y.detach().to("cpu", torch.int64).reshape(-1).contiguous().numpy()
            outputs = [torch.from_numpy(o) for o in session.run(names, feeds)]
        self.check_outputs(x_t.shape[0], **dict(zip(names, outputs)))
        return outputs

    def _run_cuda(self, session, names: list[str], x_t, t, y) -> list[torch.Tensor]:
        dev, index = self.device, self.device.index
        inputs = {"x_t": x_t.detach().to(dev, torch.float32).contiguous(),
                  "t": t.detach().to(dev, torch.int64).reshape(-1).contiguous()}
        if self.config.num_classes:
            inputs["y"] = y.detach().to(dev, torch.int64).reshape(-1).contiguous()
        b, _, h, w = inputs["x_t"].shape
        channels = {"eps": self.config.in_channels, "masks": self.num_regions}
        outputs = [torch.empty((b, channels[name], h, w), device=dev, dtype=torch.float32) for name in names]
        binding = session.io_binding()
        for name, tensor in inputs.items():
            binding.bind_input(name, "cuda", index, np.float32 if tensor.is_floating_point() else np.int64,
                               tuple(tensor.shape), tensor.data_ptr())
        for name, tensor in zip(names, outputs):
            binding.bind_output(name, "cuda", index, np.float32, tuple(tensor.shape), tensor.data_ptr())
        torch.cuda.current_stream(dev).synchronize()  # inputs written on torch's stream; ORT uses its own
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs

