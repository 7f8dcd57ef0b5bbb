from .pipeline_flow_matching import FlowMatchingPipeline
from .pipeline_reward_tilted_flow_map import RewardTiltedFlowMapPipeline
from .pipeline_variational_flow_map import VariationalFlowMapPipeline

__all__ = ["FlowMatchingPipeline", "VariationalFlowMapPipeline", "RewardTiltedFlowMapPipeline"]
