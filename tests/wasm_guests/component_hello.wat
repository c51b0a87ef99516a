;; A WASI preview 2 component: its `wasi:cli/run@0.2.0` export writes "hello from a
;; component\n" through wasi:cli/stdout and wasi:io/streams, then returns ok (err if the
;; write failed). Hand-written: no component toolchain (wasm-tools, wit-bindgen) is needed.
(component
  (import "wasi:io/error@0.2.0" (instance $error
    (export "error" (type (sub resource)))))
  (alias export $error "error" (type $error_type))
  (import "wasi:io/streams@0.2.0" (instance $streams
    (export "output-stream" (type $os (sub resource)))
    (alias outer 1 $error_type (type $e))
    (export "error" (type $err (eq $e)))
    (type $stream-error (variant (case "last-operation-failed" (own $err)) (case "closed")))
    (export "stream-error" (type $se (eq $stream-error)))
    (export "[method]output-stream.blocking-write-and-flush"
      (func (param "self" (borrow $os)) (param "contents" (list u8))
            (result (result (error $se)))))))
  (alias export $streams "output-stream" (type $output_stream))
  (import "wasi:cli/stdout@0.2.0" (instance $stdout
    (alias outer 1 $output_stream (type $o))
    (export "output-stream" (type $os (eq $o)))
    (export "get-stdout" (func (result (own $os))))))

  ;; the memory the lowered write reads the bytes from and stores its result in
  (core module $Memory (memory (export "memory") 1))
  (core instance $memory (instantiate $Memory))
  (alias core export $memory "memory" (core memory $mem))
  (core func $get_stdout (canon lower (func $stdout "get-stdout")))
  (core func $write
    (canon lower (func $streams "[method]output-stream.blocking-write-and-flush") (memory $mem)))
  (core instance $host
    (export "memory" (memory $mem))
    (export "get-stdout" (func $get_stdout))
    (export "write" (func $write)))

  (core module $Main
    (import "host" "memory" (memory 1))
    (import "host" "get-stdout" (func $get_stdout (result i32)))
    (import "host" "write" (func $write (param i32 i32 i32 i32)))
    (data (i32.const 16) "hello from a component\n")
    ;; result<_, stream-error> lands at 64; its first byte is 0 for ok: return it as is
    (func (export "run") (result i32)
      (call $write (call $get_stdout) (i32.const 16) (i32.const 23) (i32.const 64))
      (i32.load8_u (i32.const 64))))
  (core instance $main (instantiate $Main (with "host" (instance $host))))

  (func $run (result (result)) (canon lift (core func $main "run")))
  (instance $run_instance (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run_instance)))
