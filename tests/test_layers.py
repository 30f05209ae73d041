"""The import graph points one way: the model files at the bottom, the checkpoint format, the
training path, then the tools. Checked on the source (every import, at the top or in a function)
and on a fresh interpreter (`import model` loads the model files, ckpt, torch and safetensors)."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
# Each layer may import its own and the layers before it, never a later one.
LAYERS = [{"vit", "qformer", "qwen", "ckpt"}, {"phi"}, {"model", "lora", "quant"}, {"tokenizer", "runtime", "synthetic"},
          {"data", "formats", "index"}, {"pipeline", "evaluate"}, {"plan"}, {"train", "datacheck"},
          {"convert", "chat", "serve", "download", "bench", "bench_data", "rehearse"}]
TOOLS = {"convert", "chat", "serve", "download", "bench", "bench_data", "rehearse"}


def imports(name):
    """Project modules `name` imports, anywhere in the file (a command-line block included)."""
    tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return (found & MODULES) - {name}


def test_every_import_points_down():
    layer = {m: i for i, group in enumerate(LAYERS) for m in group}
    assert MODULES <= set(layer), f"modules with no layer: {sorted(MODULES - set(layer))}"
    for name in sorted(MODULES):
        for dep in sorted(imports(name)):
            assert layer[dep] <= layer[name], f"{name}.py imports {dep}.py, a later layer"
            # tools stand alone; the benchmarks drive the others, the server shares chat.py's engine
            assert dep not in TOOLS or name == "bench" or (name, dep) == ("serve", "chat"), \
                f"{name}.py imports the tool {dep}.py"


def test_import_model_loads_only_the_model_files():
    code = ("import sys, torch, safetensors.torch; before = set(sys.modules); import model; "
            "print(sorted(m for m in set(sys.modules) - before if '.' not in m))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "['ckpt', 'model', 'phi', 'qformer', 'qwen', 'vit']"
