"""Stage 3: metanetworks on gradient graphs (GradMetaNet, GradMetaNet++, the paper's baselines) and their
layers, all scatter ops over the graph's index vectors."""
from .editing import WeightEditor
from .encoding import (
           CalibratedStatistics,
           EntryEncoder,
           LogScaleStandardizer,
           NodeEncoding,
           RunningScale,
           calibrate_scales,
           scale_normalize,
)
from .heads import GraphHead, NodeHead, PairwiseSetHead, ParamHead
from .layers import AttentionBlock, NeuronBlock, NeuronLayer, SetBlock, SetNeuronLayer, SetPooling, WeightMessages
from .layout import BatchLayout
from .models import GradMetaNet, GradMetaNetPlusPlus

__all__ = ["GradMetaNet", "GradMetaNetPlusPlus", "WeightEditor", "BatchLayout", "EntryEncoder", "NodeEncoding",
           "scale_normalize", "RunningScale", "LogScaleStandardizer", "CalibratedStatistics", "calibrate_scales",
           "SetNeuronLayer", "SetBlock", "SetPooling", "NeuronLayer", "NeuronBlock", "WeightMessages",
           "AttentionBlock", "NodeHead", "GraphHead", "ParamHead", "PairwiseSetHead"]
