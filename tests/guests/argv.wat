;; argv.wat — prints its arguments, one per line.
;;
;; Why: checks the argv half of the request contract: argv[0] the request
;; path, then the query split on "&" (not decoded), or an `argv` template.
;;
;; Output:  content-type: text/plain
;;          (blank line)
;;          argv[0]
;;          argv[1]   … one line each
;;
;; Memory:  0..7 iovec {ptr, len}; 8..15 two i32 results; 64.. the header block;
;;          65536.. the arguments: pointers, then the strings (grown to fit).
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get"
    (func $args_sizes_get (param $count i32) (param $size i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get"
    (func $args_get (param $ptrs i32) (param $strs i32) (result i32)))

  (memory (export "memory") 2)

  (global $ARGS i32 (i32.const 65536))

  (data (i32.const 64) "content-type: text/plain\n\n")  ;; 26 bytes

  ;; Write [ptr, ptr+len) to stdout, retrying short writes; stops on an error
  ;; or a write that makes no progress.
  (func $print (param $ptr i32) (param $len i32)
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $len)))
        (i32.store (i32.const 0) (local.get $ptr))
        (i32.store (i32.const 4) (local.get $len))
        (br_if $done (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
        (br_if $done (i32.eqz (i32.load (i32.const 8))))
        (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 8))))
        (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 8))))
        (br $more))))

  ;; Grow memory so that [0, end) is addressable; traps if the host refuses.
  (func $reserve (param $end i32)
    (local $pages i32)
    (local.set $pages (i32.shr_u (i32.add (local.get $end) (i32.const 65535)) (i32.const 16)))
    (if (i32.gt_u (local.get $pages) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
          (then unreachable)))))

  (func (export "_start")
    (local $count i32) (local $size i32) (local $strs i32) (local $i i32)
    (call $print (i32.const 64) (i32.const 26))
    (if (call $args_sizes_get (i32.const 8) (i32.const 12)) (then (return)))
    (local.set $count (i32.load (i32.const 8)))
    (local.set $size (i32.load (i32.const 12)))
    (local.set $strs (i32.add (global.get $ARGS) (i32.shl (local.get $count) (i32.const 2))))
    (call $reserve (i32.add (local.get $strs) (local.get $size)))
    (if (call $args_get (global.get $ARGS) (local.get $strs)) (then (return)))
    ;; The strings lie back to back, each ending in NUL: NUL → newline.
    (block $end
      (loop $next
        (br_if $end (i32.ge_u (local.get $i) (local.get $size)))
        (if (i32.eqz (i32.load8_u (i32.add (local.get $strs) (local.get $i))))
          (then (i32.store8 (i32.add (local.get $strs) (local.get $i)) (i32.const 10))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (call $print (local.get $strs) (local.get $size))))
