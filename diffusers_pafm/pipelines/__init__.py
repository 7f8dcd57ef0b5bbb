from .pipeline_flow_matching import FlowMatchingPipeline

__all__ = ["FlowMatchingPipeline"]
