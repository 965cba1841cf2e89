"""torch → ONNX export and graph checks (generic over families)."""

from vlm_export.export.checks import ExportCheckError, check_against_torch, check_graph, torch_outputs
from vlm_export.export.onnx_export import export_component

__all__ = ["ExportCheckError", "check_against_torch", "check_graph", "export_component", "torch_outputs"]
