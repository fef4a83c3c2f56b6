"""DreamerV2 networks, the discrete RSSM and their TensorDict modules."""
from torchrl_dreamer.modules.actor import ActorV2, StraightThroughOneHotCategorical, make_dreamerv2_actor
from torchrl_dreamer.modules.builders import (
    DEBUG_SIZES,
    DreamerV2Models,
    is_discrete_action_spec,
    make_dreamerv2_models,
    reco_key,
    select_obs_keys,
)
from torchrl_dreamer.modules.models import (
    DreamerV2Policy,
    RSSMObserveV2,
    RSSMPosteriorStepV2,
    RSSMPriorStepV2,
    WorldModelV2,
    shift_actions,
)
from torchrl_dreamer.modules.networks import (
    MLP,
    ConvDecoderV2,
    ConvEncoderV2,
    FeatHead,
    MLPDecoderV2,
    MLPEncoderV2,
    conv_layout,
    count_parameters,
    glorot_init_,
    preprocess_obs,
)
from torchrl_dreamer.modules.observation import ObsDecoderV2, ObsEncoderV2
from torchrl_dreamer.modules.rssm import LayerNormGRUCell, RSSMV2, straight_through_sample
from torchrl_dreamer.modules.shards import ShardPool, run_sharded, shard_generator
