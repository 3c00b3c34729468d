# Sourced by the scripts: make (or reuse) the virtualenv and install the project into it.
# VENV defaults to .venv in the repository; CPU torch is pinned first so pip never pulls a CUDA build.
# The install is quiet: pip's and the build backend's output go to $VENV/.cqil-install.log, which is
# printed only when a step fails (setuptools notes such as "Editable installation" are not for users).
VENV="${VENV:-$PWD/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
stamp="$VENV/.cqil-installed"
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  echo "installing cqil-pipeline into $VENV ..." >&2
  log="$VENV/.cqil-install.log"
  if ! {
    "$VENV/bin/python" -m pip install -q --upgrade pip &&
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" &&
    "$VENV/bin/python" -m pip install -q -e ".[test]"
  } >"$log" 2>&1; then
    cat "$log" >&2
    echo "installing cqil-pipeline failed (log above, also in $log)" >&2
    return 1
  fi
  touch "$stamp"
fi
# The build's second held-out text (data.second_eval = "jargon-file") and the prose its recovery mixes in
# (data.mix = "fortunes"): the Jargon File and the fortunes collections, two Debian packages.
for cqil_deb in jargon-text:/usr/share/doc/jargon-text/jargon.txt.gz fortunes:/usr/share/games/fortunes/literature; do
  cqil_pkg=${cqil_deb%%:*} cqil_file=${cqil_deb#*:}
  if [[ ! -f $cqil_file ]] && command -v apt-get >/dev/null && [[ $EUID -eq 0 ]]; then
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$cqil_pkg" \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$cqil_pkg"; }; } >/dev/null 2>&1 \
      || echo "could not install $cqil_pkg: set data.second_eval = \"\" / data.mix = \"\" or install it by hand" >&2
  fi
done
unset cqil_deb cqil_pkg cqil_file
export PATH="$VENV/bin:$PATH"
export TOKENIZERS_PARALLELISM=false
