;; A component whose `wasi:cli/run@0.2.0` returns err (exit status 1), and which exports a
;; plain function `thunk` (returns nothing) to run as component_fail.wasm#thunk.
(component
  (core module $m
    (func (export "run") (result i32) (i32.const 1))
    (func (export "thunk")))
  (core instance $i (instantiate $m))
  (func $run (result (result)) (canon lift (core func $i "run")))
  (func $thunk (canon lift (core func $i "thunk")))
  (instance $run_instance (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run_instance))
  (export "thunk" (func $thunk)))
