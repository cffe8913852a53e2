;; echo.wat — reflects the request: its body, a `---` line, then the environment.
;;
;; Why: the demo's way to see exactly what the host hands a guest (the WAGI
;; variables, tenant env, request headers as HTTP_*), and the tests' way to
;; check the request → guest half of the contract. With an empty body its
;; output is just the environment, so no separate env_dump guest exists.
;;
;; Output:  content-type: text/plain
;;          (blank line)
;;          <request body, byte for byte>
;;          ---
;;          NAME=value            one line per variable, in the order given
;;
;; A newline always precedes `---`, so the body is exactly what comes before
;; the last "\n---\n" (no variable line can contain one). The body is copied
;; as it comes, 64 KiB at a time, so a body of any size needs no more memory.
;;
;; Memory:  0..7 iovec {ptr, len}; 8..15 two i32 results; 64.. constant text;
;;          65536..131071 stdin buffer; 131072.. environment (grown to fit).
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                   (param $nread i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes_get (param $count i32) (param $size i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get"
    (func $environ_get (param $ptrs i32) (param $strs i32) (result i32)))

  (memory (export "memory") 3)

  (global $IOV i32 (i32.const 0))
  (global $RESULT i32 (i32.const 8))
  (global $RESULT2 i32 (i32.const 12))
  (global $BUF i32 (i32.const 65536))
  (global $BUF_LEN i32 (i32.const 65536))
  (global $ENV i32 (i32.const 131072))

  (data (i32.const 64) "content-type: text/plain\n\n")  ;; 26 bytes
  (data (i32.const 96) "\n---\n")                      ;; 5 bytes

  ;; Write [ptr, ptr+len) to fd, retrying short writes. Returns 0 or an errno;
  ;; a write that makes no progress counts as EIO (29) rather than a spin.
  (func $write_all (param $fd i32) (param $ptr i32) (param $len i32) (result i32)
    (local $err i32) (local $done i32)
    (block $finished
      (loop $more
        (br_if $finished (i32.eqz (local.get $len)))
        (i32.store (global.get $IOV) (local.get $ptr))
        (i32.store offset=4 (global.get $IOV) (local.get $len))
        (local.set $err (call $fd_write (local.get $fd) (global.get $IOV) (i32.const 1)
                                        (global.get $RESULT)))
        (if (local.get $err) (then (return (local.get $err))))
        (local.set $done (i32.load (global.get $RESULT)))
        (if (i32.eqz (local.get $done)) (then (return (i32.const 29))))
        (local.set $ptr (i32.add (local.get $ptr) (local.get $done)))
        (local.set $len (i32.sub (local.get $len) (local.get $done)))
        (br $more)))
    (i32.const 0))

  ;; Grow memory so that [0, end) is addressable; traps if the host refuses.
  (func $reserve (param $end i32)
    (local $pages i32)
    (local.set $pages (i32.shr_u (i32.add (local.get $end) (i32.const 65535)) (i32.const 16)))
    (if (i32.gt_u (local.get $pages) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
          (then unreachable)))))

  ;; Copy stdin to stdout until EOF (a read of 0 bytes) or any error.
  (func $copy_stdin
    (local $n i32)
    (block $eof
      (loop $next
        (i32.store (global.get $IOV) (global.get $BUF))
        (i32.store offset=4 (global.get $IOV) (global.get $BUF_LEN))
        (br_if $eof (call $fd_read (i32.const 0) (global.get $IOV) (i32.const 1)
                                   (global.get $RESULT)))
        (local.set $n (i32.load (global.get $RESULT)))
        (br_if $eof (i32.eqz (local.get $n)))
        (br_if $eof (call $write_all (i32.const 1) (global.get $BUF) (local.get $n)))
        (br $next))))

  ;; Write every variable as NAME=value\n. environ_get lays the strings out
  ;; back to back, each ending in NUL: turning each NUL into a newline makes
  ;; the whole block the output.
  (func $write_env
    (local $count i32) (local $size i32) (local $strs i32) (local $i i32)
    (if (call $environ_sizes_get (global.get $RESULT) (global.get $RESULT2)) (then (return)))
    (local.set $count (i32.load (global.get $RESULT)))
    (local.set $size (i32.load (global.get $RESULT2)))
    (local.set $strs (i32.add (global.get $ENV) (i32.shl (local.get $count) (i32.const 2))))
    (call $reserve (i32.add (local.get $strs) (local.get $size)))
    (if (call $environ_get (global.get $ENV) (local.get $strs)) (then (return)))
    (block $end
      (loop $next
        (br_if $end (i32.ge_u (local.get $i) (local.get $size)))
        (if (i32.eqz (i32.load8_u (i32.add (local.get $strs) (local.get $i))))
          (then (i32.store8 (i32.add (local.get $strs) (local.get $i)) (i32.const 10))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (drop (call $write_all (i32.const 1) (local.get $strs) (local.get $size))))

  (func (export "_start")
    (drop (call $write_all (i32.const 1) (i32.const 64) (i32.const 26)))
    (call $copy_stdin)
    (drop (call $write_all (i32.const 1) (i32.const 96) (i32.const 5)))
    (call $write_env)))
