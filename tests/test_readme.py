"""The README stays true: its file table, the commands it shows and the output it quotes."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_file_table_names_every_module_with_its_line_count():
    rows = re.findall(r"^\| `?([\w/.]+\.py)`? \| .* \| (\d+) \|$", README, re.M)
    listed = {name: int(n) for name, n in rows}
    modules = {f for f in os.listdir(ROOT) if f.endswith(".py")}
    assert modules <= set(listed), f"modules missing from the README's file table: {sorted(modules - set(listed))}"
    for name, n in listed.items():
        with open(os.path.join(ROOT, name)) as f:
            assert sum(1 for _ in f) == n, f"README says {name} has {n} lines"


def test_commands_name_real_scripts_kinds_and_presets():
    import convert
    import train
    kinds = {k[len("convert_"):] for k in vars(convert) if k.startswith("convert_")}
    for kind in re.findall(r"python convert\.py (\w+)", README):
        assert kind in kinds, f"README: convert.py has no kind {kind!r}"
    for preset in re.findall(r"train\.py --preset=([\w.-]+)", README):
        assert preset in train.TRAIN_PRESETS, f"README: train.py has no preset {preset!r}"
    fields = {f.name for f in train.Config.__dataclass_fields__.values()}
    for key in re.findall(r"train\.py[^\n#]*?--(\w+)=", README):
        assert key in fields, f"README: train.py has no option --{key}"
    for script in set(re.findall(r"python (\w+\.py)", README)):
        assert os.path.exists(os.path.join(ROOT, script)), f"README names {script}, which does not exist"


def test_quoted_pipeline_timeline_is_what_the_cli_prints():
    out = subprocess.run([sys.executable, "pipeline.py", "--stages", "4", "--microbatches", "8", "--schedule", "1f1b"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() in README
