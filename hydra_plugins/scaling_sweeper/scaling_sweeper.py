"""Hydra loads sweeper plugins only from the `hydra_plugins` namespace (it checks the class's
module), so this shim subclasses the real sweeper in `scaling.sweeper` and registers it as
`hydra/sweeper=scaling`. Keep it free of heavy imports: Hydra scans it at every start-up."""
from hydra.core.config_store import ConfigStore

from scaling.sweeper import ScalingSweeper as _ScalingSweeper
from scaling.sweeper import sweeper_node


class ScalingSweeper(_ScalingSweeper):
    """Ray Tune + stratified ASHA sweeper (see scaling.sweeper)."""


ConfigStore.instance().store(group="hydra/sweeper", name="scaling", node=sweeper_node(), provider="scaling")
