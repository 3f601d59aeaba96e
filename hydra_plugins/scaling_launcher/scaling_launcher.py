"""Hydra instantiates launchers only from the `hydra_plugins` namespace (it checks the class's module),
so this shim subclasses the real launcher in `scaling.submitit_launcher` for hydra/launcher=slurm. Hydra
imports it at every start-up: it stays light, and without the slurm extra (hydra-submitit-launcher) it
defines nothing rather than warn."""
from importlib.util import find_spec

if find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
    from scaling.submitit_launcher import SlurmLauncher as _SlurmLauncher

    class SlurmLauncher(_SlurmLauncher):
        """Hydra's submitit SLURM launcher; a submission sbatch refuses ends in one line (scaling.submitit_launcher)."""
