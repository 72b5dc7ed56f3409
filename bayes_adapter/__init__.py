"""bayes-adapter: Bayesian LoRA for Hugging Face PEFT.

`import bayes_adapter` registers `BayesLoraConfig` and its tuner with PEFT, so that `get_peft_model`,
diffusers' `add_adapter`, `save_pretrained` and `PeftModel.from_pretrained` accept Bayesian LoRA adapters.
"""

from . import _peft_compat
from ._version import __version__  # noqa: F401  (bayes_adapter.__version__)


_peft_compat.check_peft_version()

from .adapter import BayesianAdapter  # noqa: E402
from .bayes import elbo_kl_weight, gaussian_kl, posterior_std, softplus_inverse  # noqa: E402
from .config import PEFT_TYPE_NAME, BayesLoraConfig  # noqa: E402
from .export import export_lora  # noqa: E402
from .hub import push_to_hub  # noqa: E402
from .layer import (  # noqa: E402
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesEmbedding,
    BayesLinear,
    BayesLoraLayer,
)
from .model import BayesLoraModel  # noqa: E402
from .model_functions import (  # noqa: E402
    bayes_layers,
    cast_adapter_params,
    kl_divergence,
    kl_loss,
    param_groups,
    posterior_std_stats,
    posterior_stds,
)
from .sample_measures import (  # noqa: E402
    is_clean_copy,
    latent_residuals,
    measure_samples,
    spectral_flatness,
    ssim_matrix,
    structural_fidelity,
)
from .save_and_load import load_bayesian_adapter, load_bayesian_weights, save_bayesian_adapter  # noqa: E402
from .stage import (  # noqa: E402
    MONITOR_SCHEMA,
    Episode,
    MonitorFileError,
    MonitorRecord,
    StageVerdict,
    append_monitor_record,
    drop_records_after,
    judge,
    read_monitor,
    verdict_sentence,
)


_peft_compat.register(PEFT_TYPE_NAME.lower(), BayesLoraConfig, BayesLoraModel, prefix=BayesLoraModel.prefix)

__all__ = [
    "BayesConv1d",
    "BayesConv2d",
    "BayesConv3d",
    "BayesEmbedding",
    "BayesLinear",
    "BayesLoraConfig",
    "BayesLoraLayer",
    "BayesLoraModel",
    "BayesianAdapter",
    "Episode",
    "MONITOR_SCHEMA",
    "MonitorFileError",
    "MonitorRecord",
    "StageVerdict",
    "append_monitor_record",
    "bayes_layers",
    "cast_adapter_params",
    "drop_records_after",
    "elbo_kl_weight",
    "export_lora",
    "gaussian_kl",
    "is_clean_copy",
    "judge",
    "kl_divergence",
    "kl_loss",
    "latent_residuals",
    "load_bayesian_adapter",
    "load_bayesian_weights",
    "measure_samples",
    "param_groups",
    "posterior_std",
    "posterior_std_stats",
    "posterior_stds",
    "push_to_hub",
    "read_monitor",
    "save_bayesian_adapter",
    "softplus_inverse",
    "spectral_flatness",
    "ssim_matrix",
    "structural_fidelity",
    "verdict_sentence",
]
