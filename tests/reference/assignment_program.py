"""An interpreter, independent of the generator, for cross_chunk's assignment-language programs
(`x = 7`, `y = x`, `assert y == 7`, `# part N` markers): the tests of the generator and of the
long-context reference model both check every answer with it."""
import re


def run_program(text: str) -> tuple[dict, list[tuple[str, str]]]:
    """Interpret the assignment language: final environment and (value, asserted) per assert."""
    env, asserts = {}, []
    for line in text.splitlines():
        if m := re.fullmatch(r"assert (\w+) == (\d+)", line):
            asserts.append((env[m[1]], m[2]))
        elif m := re.fullmatch(r"(\w+) = (\w+)", line):
            env[m[1]] = m[2] if m[2].isdigit() else env[m[2]]
        else:
            assert line.startswith("# part "), line
    return env, asserts
