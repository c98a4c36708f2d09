"""Write the GhostNetV2/V3 key listings of this folder from the authors' model definitions.

    python tests/data/keys_from_authors.py PATH/TO/Efficient-AI-Backbones

No GhostNetV2/V3 checkpoint can be downloaded where these listings were made, so they come
from the authors' code (the module tree their released files were saved from), at the commit
named in each file's header; timm's definitions are compared with them by the tests. The
released files may hold more beside these keys (a training checkpoint's optimizer, an EMA copy,
thop's ``total_ops``/``total_params`` counters): see ``models.weights.released_state_dict``.
"""
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
# name here: (file in the authors' repository, how it builds the model)
MODELS = {
    "ghostnetv2_1x": ("ghostnetv2_pytorch/model/ghostnetv2_torch.py", "ghostnetv2(num_classes=1000, width=1.0, "
                      "dropout=0.2, args=None)"),
    "ghostnetv2_1_3x": ("ghostnetv2_pytorch/model/ghostnetv2_torch.py", "ghostnetv2(num_classes=1000, width=1.3, "
                        "dropout=0.2, args=None)"),
    "ghostnetv2_1_6x": ("ghostnetv2_pytorch/model/ghostnetv2_torch.py", "ghostnetv2(num_classes=1000, width=1.6, "
                        "dropout=0.2, args=None)"),
    "ghostnetv3_0_5x": ("ghostnetv3_pytorch/ghostnetv3.py", "ghostnetv3(width=0.5)"),
    "ghostnetv3_1x": ("ghostnetv3_pytorch/ghostnetv3.py", "ghostnetv3(width=1.0)"),
    "ghostnetv3_1_3x": ("ghostnetv3_pytorch/ghostnetv3.py", "ghostnetv3(width=1.3)"),
    "ghostnetv3_1_6x": ("ghostnetv3_pytorch/ghostnetv3.py", "ghostnetv3(width=1.6)"),
}


def main(repo: str) -> None:
    import importlib.util

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                            check=True).stdout.strip()
    for name, (source, call) in MODELS.items():
        spec = importlib.util.spec_from_file_location(f"authors_{name}", pathlib.Path(repo) / source)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # (timm's register_model looks the module up)
        spec.loader.exec_module(module)  # (imports timm.models.registry, as the authors' code does)
        model = eval(call, vars(module))
        origin = [f"# huawei-noah/Efficient-AI-Backbones@{commit[:7]} {source}",
                  "# (written by tests/data/keys_from_authors.py; no released file was read)"]
        _write(name, [f"# {name}: the state_dict keys and shapes of the authors' {call}, defined in", *origin], model)
        if name == "ghostnetv3_1x":  # and the deploy form, as the authors' reparameterize() leaves it
            model.eval().reparameterize()
            _write(f"{name}.deploy", [f"# {name}, deploy form: the keys and shapes of the authors' {call} after "
                                      "its .reparameterize(), defined in", *origin], model)


def _write(name, header, model):
    lines = header + [f"{key}\t{tuple(value.shape)}" for key, value in model.state_dict().items()]
    (HERE / f"{name}.keys.tsv").write_text("\n".join(lines) + "\n")
    print(name, len(lines) - len(header), "keys")


if __name__ == "__main__":
    main(sys.argv[1])
