(module
  (memory (export "memory") 1)
  ;; XXH32 (seed 0) of 4096-byte blocks: one block's four lanes are one v128, and four
  ;; blocks go through the loop together so that their multiply chains overlap.
  (func $fin (param $v v128) (result i32)
    (local $h i32)
    (local.set $h
      (i32.add
        (i32.add (i32.rotl (i32x4.extract_lane 0 (local.get $v)) (i32.const 1)) (i32.rotl (i32x4.extract_lane 1 (local.get $v)) (i32.const 7)))
        (i32.add (i32.rotl (i32x4.extract_lane 2 (local.get $v)) (i32.const 12)) (i32.rotl (i32x4.extract_lane 3 (local.get $v)) (i32.const 18)))))
    (local.set $h (i32.add (local.get $h) (i32.const 4096)))
    (local.set $h (i32.mul (i32.xor (local.get $h) (i32.shr_u (local.get $h) (i32.const 15))) (i32.const 0x85ebca77)))
    (local.set $h (i32.mul (i32.xor (local.get $h) (i32.shr_u (local.get $h) (i32.const 13))) (i32.const 0xc2b2ae3d)))
    (i32.xor (local.get $h) (i32.shr_u (local.get $h) (i32.const 16))))
  (func $block (param $p i32) (result i32)
    (local $a v128) (local $t v128) (local $p1 v128) (local $p2 v128) (local $i i32)
    (local.set $p1 (i32x4.splat (i32.const 0x9e3779b1)))
    (local.set $p2 (i32x4.splat (i32.const 0x85ebca77)))
    (local.set $a (v128.const i32x4 0x24234428 0x85ebca77 0 0x61c8864f))
    (loop $l
      (local.set $a (i32x4.mul
          (v128.or
            (i32x4.shl (local.tee $t (i32x4.add (local.get $a) (i32x4.mul (v128.load (i32.add (local.get $p) (local.get $i))) (local.get $p2)))) (i32.const 13))
            (i32x4.shr_u (local.get $t) (i32.const 19)))
          (local.get $p1)))
      (local.set $i (i32.add (local.get $i) (i32.const 16)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 4096))))
    (call $fin (local.get $a)))
  (func $four (param $p i32) (param $d i32)
    (local $a v128) (local $b v128) (local $c v128) (local $e v128) (local $t v128)
    (local $p1 v128) (local $p2 v128) (local $i i32) (local $q i32)
    (local.set $p1 (i32x4.splat (i32.const 0x9e3779b1)))
    (local.set $p2 (i32x4.splat (i32.const 0x85ebca77)))
    (local.set $a (v128.const i32x4 0x24234428 0x85ebca77 0 0x61c8864f))
    (local.set $b (local.get $a)) (local.set $c (local.get $a)) (local.set $e (local.get $a))
    (loop $l
      (local.set $q (i32.add (local.get $p) (local.get $i)))
      (local.set $a (i32x4.mul
          (v128.or
            (i32x4.shl (local.tee $t (i32x4.add (local.get $a) (i32x4.mul (v128.load (local.get $q)) (local.get $p2)))) (i32.const 13))
            (i32x4.shr_u (local.get $t) (i32.const 19)))
          (local.get $p1)))
      (local.set $b (i32x4.mul
          (v128.or
            (i32x4.shl (local.tee $t (i32x4.add (local.get $b) (i32x4.mul (v128.load (i32.add (local.get $q) (i32.const 4096))) (local.get $p2)))) (i32.const 13))
            (i32x4.shr_u (local.get $t) (i32.const 19)))
          (local.get $p1)))
      (local.set $c (i32x4.mul
          (v128.or
            (i32x4.shl (local.tee $t (i32x4.add (local.get $c) (i32x4.mul (v128.load (i32.add (local.get $q) (i32.const 8192))) (local.get $p2)))) (i32.const 13))
            (i32x4.shr_u (local.get $t) (i32.const 19)))
          (local.get $p1)))
      (local.set $e (i32x4.mul
          (v128.or
            (i32x4.shl (local.tee $t (i32x4.add (local.get $e) (i32x4.mul (v128.load (i32.add (local.get $q) (i32.const 12288))) (local.get $p2)))) (i32.const 13))
            (i32x4.shr_u (local.get $t) (i32.const 19)))
          (local.get $p1)))
      (local.set $i (i32.add (local.get $i) (i32.const 16)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 4096))))
    (i32.store (local.get $d) (call $fin (local.get $a)))
    (i32.store offset=4 (local.get $d) (call $fin (local.get $b)))
    (i32.store offset=8 (local.get $d) (call $fin (local.get $c)))
    (i32.store offset=12 (local.get $d) (call $fin (local.get $e))))
  ;; sums(src, count, dst): the XXH32 of `count` blocks at src, as u32s at dst.
  (func (export "sums") (param $src i32) (param $count i32) (param $dst i32)
    (local $k i32)
    (block $done
      (loop $l
        (br_if $done (i32.gt_u (i32.add (local.get $k) (i32.const 4)) (local.get $count)))
        (call $four (i32.add (local.get $src) (i32.shl (local.get $k) (i32.const 12)))
                    (i32.add (local.get $dst) (i32.shl (local.get $k) (i32.const 2))))
        (local.set $k (i32.add (local.get $k) (i32.const 4)))
        (br $l)))
    (block $end
      (loop $m
        (br_if $end (i32.ge_u (local.get $k) (local.get $count)))
        (i32.store (i32.add (local.get $dst) (i32.shl (local.get $k) (i32.const 2)))
          (call $block (i32.add (local.get $src) (i32.shl (local.get $k) (i32.const 12)))))
        (local.set $k (i32.add (local.get $k) (i32.const 1)))
        (br $m))))
)
