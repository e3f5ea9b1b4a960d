"""Latent dashboards: offline HTML pages that show what an SAE's latents encode.

``build_dashboard(sae, model, token_rows, out_dir=...)`` (and ``sae-ext dashboard SAE_DIR``)
writes ``index.html`` (every latent: firing rate, mean |activation|, positive / bipolar share,
dead / dense / bipolar flags; sortable) and one page per chosen latent: top-activating contexts
coloured per token by circuitsvis (positive and negative side apart for signed latents), an
activation histogram and the tokens its decoder direction promotes through ``W_U``. SAEs
whose :func:`~sae_ext.evaluation_spec.evaluation_spec` names groups (SASA) get a page per group
(top contexts by group norm, the code on the block's top two singular directions); those naming
an ablation hook (the scaffold's ``hook_scaffold``) get ``scaffold.html``.

Modules: :mod:`.collect` (the streaming pass and the index statistics), :mod:`.pages` (the
pages), :mod:`.html` (self-contained HTML: circuitsvis's bundle inlined, no network),
:mod:`.build` (``build_dashboard``, the CLI and the demo's dashboards).
"""

from sae_ext.dashboard.build import (
    DEMO_DASHBOARD_ARCHITECTURES,
    Dashboard,
    add_dashboard_arguments,
    build_dashboard,
    run_dashboard_command,
    write_demo_dashboard,
)

__all__ = [
    "DEMO_DASHBOARD_ARCHITECTURES",
    "Dashboard",
    "add_dashboard_arguments",
    "build_dashboard",
    "run_dashboard_command",
    "write_demo_dashboard",
]
