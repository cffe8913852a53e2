;; status_text.wat — prints `Status: 404 Not Found` with a content-type and a body.
;;
;; Why: a Status header may carry a reason phrase after the code; the code (404)
;; is what counts, and the body passes through.
;;
;; Output:  Status: 404 Not Found
;;          content-type: text/plain
;;          (blank line)
;;          nothing here
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the output.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 16)  ;; 61 bytes
    "Status: 404 Not Found\n"
    "content-type: text/plain\n"
    "\n"
    "nothing here\n")

  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 61))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
