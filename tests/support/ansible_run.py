"""Run tasks through ansible-playbook itself (AnsiballZ, argument parsing,
check and diff mode, no_log), against localhost, and return the results.

``ansible_python_interpreter`` is set to this interpreter: discovery can pick
a broken pyenv shim, and the target needs this venv's zstandard/requests.
"""

import json
import os
import subprocess
import sys

import yaml

_BIN = os.path.dirname(sys.executable)
_CALLBACKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'callback_plugins')


def ansible_env(extra=None):
    env = dict(os.environ)
    env.update(
        ANSIBLE_STDOUT_CALLBACK='record_results', ANSIBLE_CALLBACK_PLUGINS=_CALLBACKS, ANSIBLE_NOCOLOR='1',
        ANSIBLE_RETRY_FILES_ENABLED='0', ANSIBLE_LOCALHOST_WARNING='0', ANSIBLE_INVENTORY_UNPARSED_WARNING='0',
        ANSIBLE_DEPRECATION_WARNINGS='0', ANSIBLE_PYTHON_INTERPRETER=sys.executable,
    )
    if extra:
        env.update(extra)
    return env


class PlaybookRun(object):
    def __init__(self, returncode, results, stdout, stderr):
        self.returncode = returncode
        self.results = results
        self.stdout = stdout
        self.stderr = stderr

    def __getitem__(self, index):
        return self.results[index]

    def __len__(self):
        return len(self.results)


def _ansible_playbook(plays, tmp_path, name, check, diff, extra_vars, env, verbosity=0):
    """Write ``plays`` to a playbook in tmp_path, run it on localhost with the
    recording callback; return (process, parsed JSON record)."""
    tmp_path = str(tmp_path)
    path = os.path.join(tmp_path, '%s-%d.yml' % (name, os.getpid()))
    with open(path, 'w') as f:
        yaml.safe_dump(plays, f)
    cmd = [os.path.join(_BIN, 'ansible-playbook'), '-i', 'localhost,', path]
    if extra_vars:
        vars_path = os.path.join(tmp_path, '%s-%d-vars.json' % (name, os.getpid()))
        with open(vars_path, 'w') as f:
            json.dump(extra_vars, f)
        cmd += ['-e', '@' + vars_path]
    if check:
        cmd.append('--check')
    if diff:
        cmd.append('--diff')
    if verbosity:
        cmd.append('-' + 'v' * verbosity)
    proc = subprocess.run(cmd, env=ansible_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=600, check=False)
    try:
        # The callback's document is the last thing printed; with -v and more,
        # other output (configuration, connection lines) comes before it.
        doc = json.loads(proc.stdout[proc.stdout.rindex('{"plays"'):])
    except ValueError:
        raise AssertionError('ansible-playbook printed no JSON (rc %d):\n%s\n%s'
                             % (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:]))
    return proc, doc


def run_playbook(tasks, tmp_path, check=False, diff=False, extra_vars=None, env=None, expect_failure=False,
                 verbosity=0):
    """Run ``tasks`` (a list of task dicts) on localhost; return PlaybookRun
    whose ``results`` are the per-task result dicts in order.  ``verbosity``
    3 runs with -vvv (what secrets must survive)."""
    play = [{
        'hosts': 'localhost', 'connection': 'local', 'gather_facts': False,
        'vars': dict({'ansible_python_interpreter': sys.executable}, **(extra_vars or {})),
        'tasks': tasks,
    }]
    proc, doc = _ansible_playbook(play, tmp_path, 'play', check, diff, None, env, verbosity)
    results = [t['hosts']['localhost'] for t in doc['plays'][0]['tasks']]
    if proc.returncode != 0 and not expect_failure:
        raise AssertionError('ansible-playbook failed (rc %d): %s\n%s'
                             % (proc.returncode, json.dumps(results[-1:], indent=1)[-3000:], proc.stderr[-2000:]))
    return PlaybookRun(proc.returncode, results, proc.stdout, proc.stderr)


class PlaysRun(PlaybookRun):
    """The outcome of run_plays(): ``results`` holds the result of every task
    that ran on localhost, across all plays, in order; ``names`` their task
    names ('<role> : <task>' for role tasks)."""

    def __init__(self, returncode, names, results, stdout, stderr):
        super(PlaysRun, self).__init__(returncode, results, stdout, stderr)
        self.names = names

    def changed(self):
        """Names of the tasks that reported a change."""
        return [n for n, r in zip(self.names, self.results) if r.get('changed')]

    def failed(self):
        return [n for n, r in zip(self.names, self.results) if r.get('failed')]

    def task(self, name):
        """The result of the last task whose name ends with ``name``."""
        found = [r for n, r in zip(self.names, self.results) if n.endswith(name)]
        if not found:
            raise KeyError('no task named %r ran; tasks: %s' % (name, self.names))
        return found[-1]


def run_plays(plays, tmp_path, check=False, diff=False, extra_vars=None, env=None, expect_failure=False,
              name='site'):
    """Run whole plays (roles, pre_tasks, gather_facts: anything a playbook
    holds) against localhost through ansible-playbook; ``extra_vars`` go in
    with ``-e @file`` (highest precedence).  Returns PlaysRun.  Plays set
    their own ``ansible_python_interpreter``.  Handlers that ran appear as
    tasks of their own."""
    proc, doc = _ansible_playbook(plays, tmp_path, name, check, diff, extra_vars, env)
    names, results = [], []
    for play in doc['plays']:
        for task in play['tasks']:
            if 'localhost' in task['hosts']:
                names.append(task['task']['name'])
                results.append(task['hosts']['localhost'])
    run = PlaysRun(proc.returncode, names, results, proc.stdout, proc.stderr)
    if proc.returncode != 0 and not expect_failure:
        raise AssertionError('ansible-playbook failed (rc %d): failed tasks %s\n%s\n%s'
                             % (proc.returncode, run.failed(), json.dumps(results[-1:], indent=1)[-3000:],
                                proc.stderr[-2000:]))
    return run
