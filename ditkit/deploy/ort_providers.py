"""Which onnxruntime execution provider runs an exported graph on the CPU.

- ``cpu`` (default): onnxruntime's own CPU kernels (MLAS), fp32, exact.
- ``openvino``: the OpenVINO plugin execution provider (the ``onnxruntime-ep-openvino``
  package, loaded into onnxruntime >= 1.23 with ``register_execution_provider_library``), with
  OpenVINO's inference precision pinned to f32: the same arithmetic in fp32, compiled by
  OpenVINO into its own fused kernels.
- ``openvino-bf16``: the same provider with inference precision bf16. The file, its inputs and
  its outputs stay fp32; OpenVINO runs the matrix products and attention in bf16 on the CPU's
  AMX / AVX-512-BF16 units. **An approximation** (8 mantissa bits, like ``--precision bf16``
  exports): opt-in, checked against fp32 eager at :data:`BF16_TOLERANCE` of the output scale.

The same ONNX file serves all three: the choice is made when the session is created
(``ditkit sample model.onnx --ort-provider openvino-bf16``, ``OrtDenoiser(path,
ort_provider=...)``, the ``onnxruntime-openvino[-bf16]`` engines of ``ditkit bench sample``).
"""

from __future__ import annotations

import json

from ditkit.errors import UserError, require

#: the values of ``--ort-provider``
CPU_PROVIDERS = ("cpu", "openvino", "openvino-bf16")
#: the plugin package that brings OpenVINO into onnxruntime (``pip install ditkit[openvino]``)
PLUGIN_PACKAGE = "onnxruntime-ep-openvino"
#: max |diff| of an ``openvino-bf16`` session against fp32 eager, relative to max(1, output
#: scale): the tolerance of bf16 exports (``export.TOLERANCE["bf16"]``)
BF16_TOLERANCE = 1e-1
_REGISTRATION = "ditkit-openvino"


class ProviderError(UserError):
    """An execution provider that cannot run here (the message says why and what to do)."""


def check_provider(name: str, flag: str = "--ort-provider") -> str:
    """``name`` if it is one of :data:`CPU_PROVIDERS`, else a :class:`ProviderError` naming
    the flag and the choices."""
    if name not in CPU_PROVIDERS:
        raise ProviderError(f"{flag} {name!r}: choose one of {', '.join(CPU_PROVIDERS)}")
    return name


def approximate(name: str) -> bool:
    """Whether ``name`` computes in a reduced precision (not exact against fp32 eager)."""
    return name.endswith("bf16")


def openvino_cpu_device(flag: str = "--ort-provider openvino"):
    """onnxruntime's ``OrtEpDevice`` for OpenVINO's CPU device, registering the plugin's
    library with onnxruntime the first time (once per process)."""
    import onnxruntime as ort

    if not hasattr(ort, "register_execution_provider_library"):
        raise ProviderError(
            f"{flag}: needs onnxruntime >= 1.23 (plugin execution providers); "
            f"this is {ort.__version__}: pip install -U onnxruntime"
        )
    plugin = require("onnxruntime_ep_openvino", flag, ProviderError)
    name = plugin.get_ep_name()
    if not _cpu_devices(name):
        try:
            ort.register_execution_provider_library(_REGISTRATION, plugin.get_library_path())
        except Exception as err:  # noqa: BLE001 - onnxruntime's own exception classes
            if "already registered" not in str(err):
                raise ProviderError(
                    f"{flag}: onnxruntime could not load the OpenVINO plugin "
                    f"({str(err).splitlines()[0]})"
                ) from None
    devices = _cpu_devices(name)
    if not devices:
        raise ProviderError(f"{flag}: the OpenVINO plugin found no CPU device here")
    return devices[0]


def _cpu_devices(ep_name: str) -> list:
    """The OpenVINO CPU devices onnxruntime knows (none until the plugin is registered)."""
    import onnxruntime as ort

    return [
        d
        for d in ort.get_ep_devices()
        if d.ep_name == ep_name and d.ep_metadata.get("ov_device") == "CPU"
    ]


def openvino_config(name: str, device, threads: int | None) -> dict[str, str]:
    """The provider options of an OpenVINO session: inference precision f32 or bf16 (refused
    where OpenVINO reports no bf16 support on this CPU) and the thread count."""
    bf16 = approximate(name)
    if bf16:
        caps = device.ep_metadata.get("OPTIMIZATION_CAPABILITIES", "")
        if "BF16" not in caps.split():
            raise ProviderError(
                f"--ort-provider {name}: OpenVINO reports no bf16 support on "
                f"this CPU (capabilities: {caps or 'none'}); use "
                "--ort-provider openvino (f32)"
            )
    cpu = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
    if threads:
        cpu["INFERENCE_NUM_THREADS"] = str(threads)
    return {"load_config": json.dumps({"CPU": cpu})}


def check_available(name: str) -> None:
    """Raise :class:`ProviderError` unless provider ``name`` can run here (the plugin loads,
    and for bf16 the CPU has it); cheap: no session is created."""
    check_provider(name)
    if name != "cpu":
        openvino_config(name, openvino_cpu_device(f"--ort-provider {name}"), None)


def add_provider(opts, name: str, threads: int | None) -> list[str] | None:
    """Put provider ``name`` on the session options ``opts``; return the ``providers`` list to
    pass to ``InferenceSession`` (``None`` when the options already carry the provider)."""
    check_provider(name)
    if name == "cpu":
        return ["CPUExecutionProvider"]
    device = openvino_cpu_device(f"--ort-provider {name}")
    opts.add_provider_for_devices([device], openvino_config(name, device, threads))
    return None
