"""The README's examples and commands stay true."""

from conftest import REPO


def test_readme_gradient_check_example_finds_the_bug():
    """The README's check_gradients example runs, finds the wrong softmax gradient, and passes when fixed."""
    text = (REPO / "README.md").read_text()
    start = text.index("### Check your own gradients")
    code = text[text.index("```python", start) + len("```python"):text.index("```\n", text.index("```python", start))]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["report"].max_rel_error > 0.1
    fixed = code.replace("p * (1 - p) * (p - np.eye(10)[y]) / len(y)", "(p - np.eye(10)[y]) / len(y)")
    assert fixed != code
    scope = {}
    exec(compile(fixed, "README.md", "exec"), scope)
    assert scope["report"].max_rel_error < 1e-6


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_command():
    lines = (REPO / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1:lines.index("```bash") + 3]
    assert block[0].startswith("python -m pip install -e . && python scripts/train.py")
    test_cmd = block[1].split("#")[0].strip()
    assert test_cmd == 'python -m pip install -e ".[test]" && python -m pytest'
    ci = (REPO / ".ci" / "run").read_text()
    # CI installs the test extra (and cuda-check, for the kernel compile tests), then runs that command
    assert 'python -m pip install -q -e ".[test,cuda-check]"' in ci and "\npython -m pytest\n" in ci


def test_readme_many_models_example_runs(tmp_path, monkeypatch, synthetic):
    """The "Many models at once" example, on 600 synthetic samples: 16 models, an ensemble, a saved stack."""
    import numpy as np

    import fastnn

    text = (REPO / "README.md").read_text()
    start = text.index("## Many models at once")
    code = text[text.index("```python", start) + len("```python"):text.index("```\n", text.index("```python", start))]
    monkeypatch.chdir(tmp_path)
    scope = {"fastnn": fastnn, "np": np, "x": synthetic[0][:600], "y": synthetic[1][:600], "x_test": synthetic[2]}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["proba"].shape == (len(synthetic[2]), 10) and len(scope["hist"]) == 16
    assert isinstance(scope["best"], fastnn.MLP)
    assert fastnn.ModelStack.load(tmp_path / "stack.npz").n_models == 16
