"""Graph passes: each rewrites an ``fx.GraphModule`` of the one dialect, in instrument / materialize pairs
(``insert_unit_gates`` / ``remove_pruned_units``, ``insert_block_gates`` / ``remove_skipped_blocks``,
``insert_exits`` / ``truncate_at_exit``, ``insert_token_selectors`` / ``pack_tokens``, ``insert_conv_gates`` /
``attention_to_conv``, ``prune_value_dims``), run by ``manager.PassManager``, which checks each pass's
pre- and postconditions and re-records shapes. Passes read the typed ``node.meta`` the analyses wrote and
insert or remove the modules of ``vitgraph.gates``; they may import analysis, gates and the ground floor,
never the axes that schedule them.
"""
