# Test-only stdout callback: prints one JSON document with every task result,
# in the shape of the former ansible.posix.json callback (plays -> tasks ->
# hosts), which ansible-core no longer ships.
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = '''
name: record_results
type: stdout
short_description: JSON document of all task results (tests only)
description: Prints every task result as one JSON document at the end of the run.
'''

import json
import time

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = 'stdout'
    CALLBACK_NAME = 'record_results'

    def __init__(self):
        super(CallbackModule, self).__init__()
        self._plays = []

    def v2_playbook_on_play_start(self, play):
        self._plays.append({'play': {'name': play.get_name()}, 'tasks': []})

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._plays[-1]['tasks'].append({'task': {'name': task.get_name()}, 'hosts': {}})
        self._task_started = time.monotonic()

    def v2_playbook_on_handler_task_start(self, task):
        # A handler is a task of its own: without this its result would be
        # filed under (and replace) the entry of the task that ran before it.
        self.v2_playbook_on_task_start(task, False)

    def _record(self, result, **extra):
        data = dict(result._result)
        data.update(extra)
        # Wall time of the task as the controller saw it (benchmarks compare tasks).
        data['_task_seconds'] = time.monotonic() - self._task_started
        self._plays[-1]['tasks'][-1]['hosts'][result._host.get_name()] = data

    def v2_runner_on_ok(self, result, **kwargs):
        self._record(result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, failed=True)

    def v2_runner_on_skipped(self, result):
        self._record(result, skipped=True)

    def v2_runner_on_unreachable(self, result):
        self._record(result, unreachable=True)

    def v2_playbook_on_stats(self, stats):
        self._display.display(json.dumps({'plays': self._plays}, default=str))
