"""bpfree's shared package: data, networks, learning rules, diagnostics and checkpoint state.

Stages (``stages/``) are thin typer CLIs over this package; nothing here reads params.yaml.
"""
