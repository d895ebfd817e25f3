"""The slow set: which tests `python -m pytest` leaves to `-m slow`.

End-to-end runs that start worker processes, send signals, fill disks, or
train in subprocesses for many steps. `python -m pytest` (the README's
command, and each Bazel target) runs every other test; `python -m pytest
-m slow` runs these; `.ci/run` runs both, so each runs once in CI. Picked by
cost from `python -m pytest --durations=0` (README, "Development").
tests/conftest.py marks them; test_test_modules.py checks that each name
still names a test.
"""

SLOW = {
    # The docs' commands, page by page (tiny trainings in subprocesses).
    "test_docs.py": ["test_page_commands"],
    "test_backbones.py": [
        "test_one_training_step_on_the_embedded_set[iresnet100]",
        "test_one_training_step_on_the_embedded_set[iresnet50]",
        "test_export_serves_without_the_package[iresnet50]",
        "test_export_serves_without_the_package[mobilefacenet]",
        "test_export_serves_without_the_package[iresnet18]",
        "test_one_training_step_on_the_embedded_set[mobilefacenet]",
    ],
    "test_export.py": [
        "test_every_backbone_export_passes_the_saved_model_check[iresnet100]",
        "test_every_backbone_export_passes_the_saved_model_check[iresnet50]",
        "test_every_backbone_export_passes_the_saved_model_check"
        "[mobilefacenet]",
    ],
    "test_backends.py": [
        "test_keras_files_load_across_backends",
        "test_layer_module_passes_under_backend",
    ],
    "test_faults.py": [
        "test_a_worker_that_dies_stops_the_other_and_a_restart_resumes",
        "test_sigkill_three_times_then_resume_equals_uninterrupted",
        "test_no_room_for_a_checkpoint_keeps_the_previous_one",
        "test_no_room_for_an_export_keeps_the_previous_one",
        "test_signal_checkpoints_the_current_step_and_says_how_to_resume",
        "test_signal_to_one_worker_stops_both_at_the_same_step",
        "test_resume_with_another_model_names_it_and_overwrites_nothing",
        "test_a_failed_resume_writes_nothing_in_the_run_directory",
        "test_a_damaged_checkpoint_is_one_line_and_an_earlier_one_resumes",
        "test_a_worker_that_fails_at_start_stops_the_other_with_one_line",
        "test_a_worker_alone_says_whom_it_waits_for_and_stops_at_the_"
        "timeout",
        "test_sigterm_while_waiting_for_a_worker_stops_at_once",
        "test_a_peer_that_answers_but_never_joins_is_ended_at_the_timeout",
    ],
    "test_ijb.py": ["test_evaluate_py_ijb_dir"],
    "test_slurm.py": [
        "test_two_srun_tasks_train_as_one_process_with_two_replicas",
        "test_scancel_stops_both_tasks_at_one_step_and_resubmitting_resumes",
    ],
    "test_install.py": [
        "test_the_install_puts_each_command_on_the_path",
        "test_each_installed_command_prints_its_help",
        "test_an_installed_command_checks_flags_before_tensorflow",
        "test_installed_train_runs_five_steps",
    ],
    "test_quiet.py": [
        "test_entry_points_print_only_the_project_lines",
        "test_importing_the_package_elsewhere_changes_no_logging",
    ],
    "test_sharded_head.py": [
        "test_two_workers_hold_and_resume_their_own_shards",
        "test_train_with_sampling_and_steps_per_loop",
        "test_resume_on_other_replica_count_reshards",
        # Four replicas; the two-replica cases of the same test stay fast.
        "test_sharded_step_is_the_replicated_step[4-asoftmax-0.0]",
        "test_sharded_step_is_the_replicated_step[4-asoftmax-0.01]",
        "test_sharded_step_is_the_replicated_step[4-cosface-0.0]",
        "test_sharded_step_is_the_replicated_step[4-cosface-0.01]",
        "test_sharded_step_is_the_replicated_step[4-arcface-0.0]",
        "test_sharded_step_is_the_replicated_step[4-arcface-0.01]",
    ],
    "test_convert.py": [
        "test_train_on_tf_writer_shards_with_other_keys",
        "test_command_prints_progress_and_refuses_in_one_line",
        "test_train_on_converted_shards_and_evaluate",
    ],
    "test_train.py": [
        "test_asoftmax_default_warmup_keeps_features_from_collapsing",
        "test_release_0_1_run_exports_and_evaluates_on_its_embedded_set",
        "test_corrupt_training_image_one_line_then_skip_corrupt",
        "test_unreadable_rec_record_exits_at_once_with_one_line",
    ],
    "test_trainer.py": [
        "test_a_preempted_worker_stops_both_at_one_step_and_resume_is_exact",
        "test_two_worker_processes_equal_one_process",
        "test_two_workers_decode_only_their_half_and_equal_one_process",
        "test_workers_that_restore_different_steps_stop",
    ],
}


def is_slow(module, name, function):
    """Whether test `name` (with its parameters; `function` without them)
    of test module file `module` is in the slow set."""
    names = SLOW.get(module, ())
    return name in names or function in names
