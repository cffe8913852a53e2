;; no_blank_line.wat — prints a header and stops: no blank line, no body.
;;
;; Why: the header block must end with a blank line; output that never ends it
;; is a broken response (500), not an empty body.
;;
;; Output:  content-type: text/plain
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the output.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 16) "content-type: text/plain\n")  ;; 25 bytes

  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 25))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
